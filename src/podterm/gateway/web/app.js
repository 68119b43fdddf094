/* podterm web terminal: a podterm.v1 client (docs/protocol.md) on xterm.js.
 *
 * What it does, in order:
 *  1. Takes the bearer token from the URL fragment (#token=...), removes it
 *     from the address bar at once and keeps it in this tab's sessionStorage;
 *     with no token anywhere it shows a form asking for one.
 *  2. Attaches to #session=ID (or a session picked from the list), or creates
 *     a new tty session sized to the fitted terminal.
 *  3. Speaks podterm.v1 over one WebSocket at a time: the token travels in the
 *     "bearer.podterm.<base64url>" subprotocol, never in a URL. Output is
 *     written to the terminal exactly once (every byte has an offset), input is
 *     kept until the server ACKs it and re-sent from hello.in_acked after a
 *     reconnect, so nothing is lost or doubled across reconnects.
 *  4. Reconnects by itself with exponential backoff and full jitter (first
 *     retry within 0.5 s, cap 30 s), at once on `drain`, and stops on EXIT.
 *
 * window.podterm is a read-only status object for tests and curious humans:
 * {state, outOffset, sessionId, cols, rows}. It is not a control surface.
 */
(function () {
  "use strict";

  // ---- podterm.v1 wire constants (docs/protocol.md §4) ----
  const MSG = Object.freeze({
    STDIN: 0x00,
    STDOUT: 0x01,
    STDERR: 0x02,
    EXIT: 0x03,
    RESIZE: 0x04,
    ACK: 0x05,
    CONTROL: 0x06,
  });
  const SUBPROTOCOL = "podterm.v1";
  const BEARER_PREFIX = "bearer.podterm.";

  // Close codes (§7) after which reconnecting cannot help.
  const CLOSE_PROTOCOL = new Set([1002, 1003, 1007, 1008, 1009]);
  const CLOSE_UNAUTHENTICATED = 4401;
  const CLOSE_FORBIDDEN = 4403;
  const CLOSE_NOT_FOUND = 4404;
  const CLOSE_WRITER_CONFLICT = 4409;
  const CLOSE_ENDED = 4410;

  // ---- limits (each from the spec or the brief) ----
  const DEFAULT_WINDOW = 262144;          // §6 default window until hello says otherwise
  const ACK_INTERVAL_MS = 100;            // §6: ACK at least every 100 ms while data flows
  const STDIN_CHUNK = 32768;              // §4: ≤ 64 KiB per message; send what the server sends
  const MAX_PENDING_INPUT = 1 << 20;      // §5.3: unacked input capped at 1 MiB
  const BACKOFF_BASE_MS = 500;            // first retry within 0.5 s
  const BACKOFF_CAP_MS = 30000;           // cap 30 s
  const HELLO_TIMEOUT_MS = 15000;         // a link that opens but never says hello is dead
  // A refused resume (4409) usually means our own previous, half-open
  // connection still holds the writer slot; the gateway frees it after two
  // missed heartbeats (2 × 15 s by default), so keep trying a bit longer.
  const WRITER_WAIT_MS = 90000;
  const MAX_NOTICES = 6;

  const TOKEN_KEY = "podterm.token";
  const RESUME_KEY_PREFIX = "podterm.resume.";

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    sessionLabel: $("session-label"),
    picker: $("picker"),
    sessions: $("sessions"),
    newSession: $("new-session"),
    notices: $("notices"),
    login: $("login"),
    tokenInput: $("token-input"),
    loginError: $("login-error"),
    terminal: $("terminal"),
  };

  const encoder = new TextEncoder();
  const decoder = new TextDecoder();

  // ---- fragment handling: runs before anything else so the token leaves
  // the address bar (and the history entry) as early as possible ----

  /** Parses "a=1&b=2" without URLSearchParams' "+" → space rule (tokens may hold "+"). */
  function parseFragment(hash) {
    const out = new Map();
    const body = hash.startsWith("#") ? hash.slice(1) : hash;
    for (const part of body.split("&")) {
      if (!part) continue;
      const eq = part.indexOf("=");
      const key = eq < 0 ? part : part.slice(0, eq);
      const raw = eq < 0 ? "" : part.slice(eq + 1);
      let value = raw;
      try { value = decodeURIComponent(raw); } catch (_) { /* keep it raw */ }
      out.set(key, value);
    }
    return out;
  }

  /** Rewrites the fragment in place (no new history entry): only #session=ID stays. */
  function setFragment(sessionId) {
    const frag = sessionId ? "#session=" + encodeURIComponent(sessionId) : "";
    history.replaceState(history.state, "", location.pathname + location.search + frag);
  }

  function readFragment() {
    const frag = parseFragment(location.hash);
    const token = frag.get("token");
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
    }
    const session = frag.get("session") || null;
    if (frag.has("token") || frag.size > (session ? 1 : 0)) {
      setFragment(session);
    }
    return { session };
  }

  const initialFragment = readFragment();

  // ---- the read-only status hook ----
  const status = {
    state: "connecting",
    outOffset: 0,
    sessionId: null,
    cols: 0,
    rows: 0,
  };
  Object.defineProperty(window, "podterm", {
    value: Object.freeze({
      get state() { return status.state; },
      get outOffset() { return status.outOffset; },
      get sessionId() { return status.sessionId; },
      get cols() { return status.cols; },
      get rows() { return status.rows; },
    }),
    writable: false,
    configurable: false,
    enumerable: true,
  });

  const STATE_TEXT = {
    login: "token needed",
    connecting: "connecting…",
    connected: "connected",
    reconnecting: "reconnecting…",
    exited: "exited",
    ended: "ended",
    failed: "failed",
  };

  function setState(state, detail) {
    status.state = state;
    ui.status.dataset.state = state;
    ui.status.textContent = STATE_TEXT[state] + (detail ? " " + detail : "");
  }

  function notice(text, kind) {
    const row = document.createElement("div");
    row.className = "notice" + (kind ? " " + kind : "");
    const span = document.createElement("span");
    span.textContent = text;
    const close = document.createElement("button");
    close.type = "button";
    close.textContent = "×";
    close.title = "dismiss";
    close.addEventListener("click", () => { row.remove(); fitSoon(); });
    row.append(span, close);
    ui.notices.append(row);
    while (ui.notices.childElementCount > MAX_NOTICES) ui.notices.firstElementChild.remove();
    fitSoon();
  }

  function clearNotices() {
    ui.notices.replaceChildren();
    fitSoon();
  }

  // ---- token and REST ----

  function getToken() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  /** base64url without padding of the token's UTF-8 bytes (§1 bearer carrier). */
  function base64url(text) {
    let bin = "";
    for (const b of encoder.encode(text)) bin += String.fromCharCode(b);
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** Calls the REST API relative to the page (works at "/" and under a prefix). */
  async function api(method, path, body) {
    const init = {
      method,
      cache: "no-store",
      headers: { Authorization: "Bearer " + getToken(), Accept: "application/json" },
    };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(new URL(path, document.baseURI), init);
    let data = null;
    try { data = await resp.json(); } catch (_) { /* empty or not JSON */ }
    if (!resp.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(resp.status, err.code || "http_" + resp.status,
        err.message || resp.status + " " + resp.statusText);
    }
    return data;
  }

  function sessionPath(id) {
    return "api/v1/sessions/" + encodeURIComponent(id);
  }

  function resumeKey(id) { return RESUME_KEY_PREFIX + id; }

  // ---- the terminal ----

  if (typeof window.Terminal !== "function" || typeof window.FitAddon !== "object") {
    setState("failed");
    notice("xterm.js is missing from vendor/: run scripts/build_web.sh and restart the gateway.", "error");
    return;
  }

  const term = new window.Terminal({
    cursorBlink: true,
    fontFamily: '"DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#1d1f21", foreground: "#c5c8c6" },
  });
  const fitAddon = new window.FitAddon.FitAddon();
  term.loadAddon(fitAddon);

  let fitTimer = null;
  /** Refits after layout settles; coalesces bursts of resize events. */
  function fitSoon() {
    if (fitTimer !== null) return;
    fitTimer = setTimeout(() => {
      fitTimer = null;
      fitNow();
    }, 30);
  }

  function fitNow() {
    if (!term.element || ui.terminal.offsetParent === null) return;
    try { fitAddon.fit(); } catch (_) { /* not rendered yet */ }
    status.cols = term.cols;
    status.rows = term.rows;
  }

  window.addEventListener("resize", fitSoon);
  if (typeof ResizeObserver === "function") {
    new ResizeObserver(fitSoon).observe(ui.terminal);
  }
  term.onResize(({ cols, rows }) => {
    status.cols = cols;
    status.rows = rows;
    if (link) link.sendResize();
  });
  term.onData((data) => { if (link) link.input(encoder.encode(data)); });
  term.onBinary((data) => {
    // Binary strings (some mouse reports) carry one byte per char code.
    const bytes = new Uint8Array(data.length);
    for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 0xff;
    if (link) link.input(bytes);
  });

  // ---- one session's client side: exactly-once output, re-sent input ----

  /**
   * SessionLink owns the state that survives reconnects for one session
   * (offsets, unacked input, resume token) and at most one WebSocket.
   */
  class SessionLink {
    constructor(sessionId, resumeToken) {
      this.id = sessionId;
      this.resumeToken = resumeToken || sessionStorage.getItem(resumeKey(sessionId)) || "";
      this.mode = "rw";
      this.window = DEFAULT_WINDOW;

      // Output: `written` is the next offset to hand to xterm (= bytes written
      // exactly once); `streamPos` the offset of the next byte on the current
      // connection; `ackable` the stream offset xterm has finished parsing;
      // `acked` the last offset we ACKed.
      this.written = 0;
      this.streamPos = 0;
      this.ackable = 0;
      this.acked = 0;
      this.ackTimer = null;

      // Input: `pending` holds every byte from input offset `inBase` on that
      // the server has not ACKed yet; `inSent` is how far this connection sent.
      // inBase is null until the first hello tells us the server's in_acked.
      this.pending = new Uint8Array(0);
      this.inBase = null;
      this.inSent = 0;
      this.inputOverflowNoted = false;

      this.ws = null;
      this.gen = 0;            // bumps per connection; stale callbacks compare it
      this.connected = false;  // hello received on the current connection
      this.everConnected = false;
      this.hellos = 0;         // connections that got as far as hello
      this.opened = false;
      this.helloTimer = null;
      this.retryTimer = null;
      this.attempt = 0;
      this.finished = false;   // exited, ended, failed or replaced: never reconnect
      this.triedReadOnly = false;
      this.writerWaitSince = null; // first refused rw attach of the current run of refusals
    }

    start() {
      status.sessionId = this.id;
      status.outOffset = 0;
      ui.sessionLabel.textContent = this.id;
      this.connect();
    }

    // -- connection lifecycle --

    connect() {
      if (this.finished) return;
      this.retryTimer = null;
      setState(this.everConnected ? "reconnecting" : "connecting");
      const gen = ++this.gen;
      const url = new URL(sessionPath(this.id) + "/attach", document.baseURI);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      url.searchParams.set("offset", String(this.written));
      url.searchParams.set("mode", this.mode);
      if (this.resumeToken) url.searchParams.set("resume_token", this.resumeToken);
      let ws;
      try {
        ws = new WebSocket(url.href, [SUBPROTOCOL, BEARER_PREFIX + base64url(getToken())]);
      } catch (err) {
        this.fail("cannot open a WebSocket: " + err.message);
        return;
      }
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      this.opened = false;
      this.connected = false;
      this.helloTimer = setTimeout(() => {
        if (gen === this.gen && !this.connected) ws.close();
      }, HELLO_TIMEOUT_MS);
      ws.onopen = () => { if (gen === this.gen) this.opened = true; };
      ws.onmessage = (ev) => { if (gen === this.gen) this.onMessage(ev.data); };
      ws.onclose = (ev) => { if (gen === this.gen) this.onClose(ev.code, ev.reason); };
      // onerror is always followed by onclose, which decides what to do.
    }

    /** Drops the current socket; `code` 1000 tells the server it was on purpose. */
    dropSocket(code, reason) {
      const ws = this.ws;
      this.ws = null;
      this.gen++;
      this.connected = false;
      clearTimeout(this.helloTimer);
      clearTimeout(this.ackTimer);
      this.ackTimer = null;
      if (ws && ws.readyState <= WebSocket.OPEN) {
        // Browsers let a page send only 1000 and 3000-4999.
        if (code === 1000 || (code >= 3000 && code <= 4999)) ws.close(code, reason);
        else ws.close(1000, reason);
      }
    }

    /** Leaves the session running on the server and forgets this link. */
    detach() {
      this.finished = true;
      clearTimeout(this.retryTimer);
      if (this.ws && this.connected) this.sendControl({ type: "detach" });
      this.dropSocket(1000, "detach");
    }

    scheduleReconnect(immediate) {
      if (this.finished || this.retryTimer !== null) return;
      // Full jitter: uniform in [0, min(cap, base * 2^attempt)].
      const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
      const delay = immediate ? 0 : Math.random() * ceiling;
      if (!immediate) this.attempt = Math.min(this.attempt + 1, 30);
      setState(this.everConnected ? "reconnecting" : "connecting",
        delay >= 1000 ? "(retry in " + Math.ceil(delay / 1000) + " s)" : "");
      const probe = !this.opened;
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null;
        if (probe) this.probeThenConnect(); else this.connect();
      }, delay);
    }

    /** Reconnects now if a retry is pending (e.g. the network came back). */
    retryNow() {
      if (this.retryTimer === null || this.finished) return;
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
      this.probeThenConnect();
    }

    /**
     * A WebSocket that failed before opening tells the page nothing (browsers
     * hide the HTTP status), so ask the REST API why: 401, 404 and 410 end the
     * retries; anything else (gateway restarting, network down) retries.
     */
    async probeThenConnect() {
      if (this.finished) return;
      const gen = this.gen;
      try {
        const s = await api("GET", sessionPath(this.id));
        if (gen !== this.gen || this.finished) return;
        if (s && s.state === "closed") {
          this.end("the session was closed");
          return;
        }
      } catch (err) {
        if (gen !== this.gen || this.finished) return;
        if (err instanceof ApiError) {
          if (err.status === 401) { this.finished = true; askForToken("The gateway did not accept the token."); return; }
          if (err.status === 403) { this.fail("forbidden: " + err.message); return; }
          if (err.status === 404 || err.status === 410) { this.end("the session no longer exists"); return; }
        }
        // Network errors and 5xx: the gateway may be restarting; keep trying.
        if (!this.everConnected && this.attempt === 0) notice("cannot reach the gateway yet: " + err.message);
        this.scheduleReconnect(false);
        return;
      }
      this.connect();
    }

    onClose(code, reason) {
      const hadHello = this.connected;
      this.ws = null;
      this.gen++;
      this.connected = false;
      clearTimeout(this.helloTimer);
      clearTimeout(this.ackTimer);
      this.ackTimer = null;
      if (this.finished) return; // exited, detached or failed: the close changes nothing
      const why = reason ? " (" + reason + ")" : "";
      if (code === CLOSE_UNAUTHENTICATED) {
        this.finished = true;
        askForToken("The token expired or was revoked; paste a new one.");
      } else if (code === CLOSE_FORBIDDEN) {
        this.fail("forbidden" + why);
      } else if (code === CLOSE_NOT_FOUND) {
        this.end("no such session" + why);
      } else if (code === CLOSE_ENDED) {
        this.end("the session ended" + why);
      } else if (code === CLOSE_WRITER_CONFLICT) {
        this.onWriterConflict(hadHello, why);
      } else if (CLOSE_PROTOCOL.has(code)) {
        this.fail("the gateway closed the connection: " + code + why);
      } else {
        // 1000 without EXIT, 1001 drain, 1006 cut, 1011, 4429 and the rest:
        // the session is still there, resume it.
        this.scheduleReconnect(false);
      }
    }

    /**
     * 4409 on a live connection: another client resumed with our token and
     * took over; stop. 4409 on an attach: the slot is taken. Never attached
     * before: watch read-only. Attached before: most likely our own half-open
     * connection still holds it (the cut may have eaten the rotated token),
     * so retry with backoff until the gateway drops it, for a while.
     */
    onWriterConflict(hadHello, why) {
      if (hadHello) {
        this.end("another client took over this session" + why);
      } else if (!this.everConnected && this.mode === "rw" && !this.triedReadOnly) {
        this.triedReadOnly = true;
        this.mode = "ro";
        notice("This session already has a writer; attached read-only.", "info");
        this.scheduleReconnect(true);
      } else {
        const now = Date.now();
        if (this.writerWaitSince === null) this.writerWaitSince = now;
        if (now - this.writerWaitSince > WRITER_WAIT_MS) {
          this.end("another client is the writer of this session" + why);
        } else {
          this.scheduleReconnect(false);
        }
      }
    }

    finish() {
      this.finished = true;
      clearTimeout(this.retryTimer);
    }

    end(text) {
      this.finish();
      setState("ended");
      notice(text, "info");
      refreshSessions();
    }

    fail(text) {
      this.finish();
      setState("failed");
      notice(text, "error");
      this.dropSocket(1000, "");
    }

    // -- receiving --

    onMessage(data) {
      if (typeof data === "string") {
        // §4: text messages are a protocol error.
        this.dropSocket(1003, "text frame");
        this.fail("the gateway sent a text frame");
        return;
      }
      const msg = new Uint8Array(data);
      if (msg.length === 0) return;
      const type = msg[0];
      const payload = msg.subarray(1);
      switch (type) {
        case MSG.STDOUT:
        case MSG.STDERR:
          if (this.connected) this.onOutput(payload);
          break;
        case MSG.ACK:
          if (payload.length === 8) this.onInputAck(readU64(payload));
          break;
        case MSG.EXIT:
          this.onExit(payload);
          break;
        case MSG.CONTROL:
          this.onControl(payload);
          break;
        default:
          break; // unknown server → client types are the server's bug; ignore
      }
    }

    onControl(payload) {
      let ctl;
      try { ctl = JSON.parse(decoder.decode(payload)); } catch (_) { return; }
      if (!ctl || typeof ctl !== "object") return;
      switch (ctl.type) {
        case "hello": this.onHello(ctl); break;
        case "gap": this.onGap(ctl); break;
        case "drain":
          // The gateway is going away: leave now and resume elsewhere.
          notice("The gateway is restarting (" + (ctl.reason || "drain") + "); reconnecting.", "info");
          this.dropSocket(1000, "drain");
          this.attempt = 0;
          this.scheduleReconnect(true);
          break;
        case "error":
          // A close with the real code follows and decides what happens; keep
          // the words for the user, except for a writer conflict, which
          // onWriterConflict explains in terms of what the page does about it.
          if (ctl.code !== "conflict") {
            notice("gateway: " + (ctl.code || "error") + ": " + (ctl.message || ""), "error");
          }
          break;
        default:
          break; // forward compatibility
      }
    }

    onHello(h) {
      clearTimeout(this.helloTimer);
      this.connected = true;
      this.everConnected = true;
      this.hellos++;
      this.attempt = 0;
      this.writerWaitSince = null;
      if (typeof h.resume_token === "string") {
        this.resumeToken = h.resume_token;
        sessionStorage.setItem(resumeKey(this.id), h.resume_token);
      }
      if (h.mode === "ro" || h.mode === "rw") this.mode = h.mode;
      term.options.disableStdin = this.mode !== "rw";
      if (Number.isSafeInteger(h.window) && h.window > 0) this.window = h.window;
      this.streamPos = Number(h.out_offset) || 0;
      this.ackable = this.streamPos;
      this.acked = this.streamPos; // the server starts from what we asked for
      for (const n of h.notices || []) notice(String(n), "info");
      setState("connected", this.mode === "ro" ? "(read-only)" : "");

      // §5.2: re-send every input byte from in_acked on, then go on with new input.
      const inAcked = Number(h.in_acked) || 0;
      if (this.inBase === null) {
        this.inBase = inAcked;
      } else {
        this.trimInput(inAcked);
        if (inAcked < this.inBase) {
          notice("The gateway remembers less input than it acknowledged (" + (this.inBase - inAcked) +
            " bytes); they cannot be re-sent.", "error");
          this.inBase = inAcked;
        }
      }
      this.inSent = this.inBase;
      if (this.mode === "rw") {
        if (!h.size || h.size.cols !== term.cols || h.size.rows !== term.rows) this.sendResize();
        this.flushInput();
      }
      if (h.state === "exited") setState("connected", "(session has exited)");
    }

    onGap(g) {
      const to = Number(g.to);
      const lost = Number(g.lost);
      if (!Number.isFinite(to)) return;
      this.streamPos = to;
      this.ackable = Math.max(this.ackable, to);
      if (to > this.written) {
        const n = Number.isFinite(lost) && lost > 0 ? lost : to - this.written;
        notice(this.hellos <= 1 && this.written === 0
          ? n + " bytes of earlier output are no longer held by the gateway."
          : n + " bytes of output were lost while disconnected.");
        this.written = to;
        status.outOffset = to;
      }
    }

    onOutput(bytes) {
      const start = this.streamPos;
      const end = start + bytes.length;
      this.streamPos = end;
      if (start > this.written) {
        // A jump the server did not announce with `gap`; still say so.
        notice(start - this.written + " bytes of output were lost.");
        this.written = start;
      }
      const gen = this.gen;
      if (end <= this.written) {
        // Already written on an earlier connection: never twice.
        this.onProcessed(gen, end);
        return;
      }
      const fresh = this.written > start ? bytes.subarray(this.written - start) : bytes;
      this.written = end;
      status.outOffset = end;
      // xterm decodes UTF-8 across writes, so a split character is fine. ACK
      // only what xterm has parsed: that is our back-pressure on the server.
      term.write(fresh, () => this.onProcessed(gen, end));
    }

    onProcessed(gen, end) {
      if (gen !== this.gen || !this.connected) return;
      if (end > this.ackable) this.ackable = end;
      if (this.ackable - this.acked >= this.window / 2) {
        this.sendAck();
      } else if (this.ackTimer === null && this.ackable > this.acked) {
        this.ackTimer = setTimeout(() => { this.ackTimer = null; this.sendAck(); }, ACK_INTERVAL_MS);
      }
    }

    onExit(payload) {
      let info = {};
      try { info = JSON.parse(decoder.decode(payload)) || {}; } catch (_) { /* keep {} */ }
      this.finish();
      this.sendAck();
      let text;
      if (info.signal !== null && info.signal !== undefined) text = "killed by signal " + info.signal;
      else if (info.code !== null && info.code !== undefined) text = "status " + info.code;
      else text = info.reason || "ended";
      setState("exited", "(" + text + ")");
      notice("The session ended: " + text + (info.reason && !text.includes(info.reason) ? " (" + info.reason + ")" : "") + ".", "info");
      term.options.disableStdin = true;
      refreshSessions();
    }

    onInputAck(offset) {
      this.trimInput(offset);
      this.flushInput();
    }

    // -- sending --

    send(bytes) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
      this.ws.send(bytes);
      return true;
    }

    sendControl(obj) {
      const body = encoder.encode(JSON.stringify(obj));
      const msg = new Uint8Array(1 + body.length);
      msg[0] = MSG.CONTROL;
      msg.set(body, 1);
      this.send(msg);
    }

    sendAck() {
      clearTimeout(this.ackTimer);
      this.ackTimer = null;
      if (!this.connected || this.ackable <= this.acked) return;
      const msg = new Uint8Array(9);
      msg[0] = MSG.ACK;
      writeU64(msg, 1, this.ackable);
      if (this.send(msg)) this.acked = this.ackable;
    }

    sendResize() {
      if (!this.connected || this.mode !== "rw") return;
      const cols = Math.max(1, Math.min(10000, term.cols));
      const rows = Math.max(1, Math.min(10000, term.rows));
      const msg = new Uint8Array([MSG.RESIZE, cols >> 8, cols & 0xff, rows >> 8, rows & 0xff]);
      this.send(msg);
    }

    /** Queues typed bytes (kept until ACKed) and sends what the window allows. */
    input(bytes) {
      if (this.finished || this.mode !== "rw" || bytes.length === 0) return;
      if (this.pending.length + bytes.length > MAX_PENDING_INPUT) {
        // The browser cannot stop the keyboard; refuse and say so (§5.3 cap).
        if (!this.inputOverflowNoted) {
          notice("Input dropped: more than 1 MiB is waiting for the gateway.", "error");
          this.inputOverflowNoted = true;
        }
        return;
      }
      const merged = new Uint8Array(this.pending.length + bytes.length);
      merged.set(this.pending, 0);
      merged.set(bytes, this.pending.length);
      this.pending = merged;
      this.flushInput();
    }

    trimInput(offset) {
      if (this.inBase === null || offset <= this.inBase) return;
      const drop = Math.min(offset - this.inBase, this.pending.length);
      this.pending = this.pending.slice(drop);
      this.inBase += drop;
      if (offset > this.inBase) this.inBase = offset; // server ahead of our buffer (fresh attach)
      if (this.inSent < this.inBase) this.inSent = this.inBase;
      if (this.pending.length < MAX_PENDING_INPUT / 2) this.inputOverflowNoted = false;
    }

    flushInput() {
      if (!this.connected || this.mode !== "rw" || this.inBase === null) return;
      const end = this.inBase + this.pending.length;
      const limit = this.inBase + this.window; // at most one window unacked in flight
      while (this.inSent < end && this.inSent < limit) {
        const from = this.inSent - this.inBase;
        const n = Math.min(STDIN_CHUNK, end - this.inSent, limit - this.inSent);
        const msg = new Uint8Array(1 + n);
        msg[0] = MSG.STDIN;
        msg.set(this.pending.subarray(from, from + n), 1);
        if (!this.send(msg)) return;
        this.inSent += n;
      }
    }
  }

  // u64 BE helpers; offsets stay below 2^53 in practice, and Number is exact there.
  function readU64(b) {
    const view = new DataView(b.buffer, b.byteOffset, 8);
    return view.getUint32(0) * 2 ** 32 + view.getUint32(4);
  }

  function writeU64(buf, at, value) {
    const view = new DataView(buf.buffer, buf.byteOffset + at, 8);
    view.setUint32(0, Math.floor(value / 2 ** 32));
    view.setUint32(4, value >>> 0);
  }

  // ---- page flow ----

  let link = null;
  let creating = false;

  function showTerminal() {
    ui.login.hidden = true;
    document.body.classList.remove("no-terminal");
    ui.picker.hidden = false;
    ui.newSession.hidden = false;
    if (!term.element) term.open(ui.terminal);
    fitNow();
    term.focus();
  }

  function askForToken(message) {
    if (link) { link.detach(); link = null; }
    sessionStorage.removeItem(TOKEN_KEY);
    setState("login");
    document.body.classList.add("no-terminal");
    ui.picker.hidden = true;
    ui.newSession.hidden = true;
    ui.login.hidden = false;
    ui.loginError.textContent = message || "";
    ui.tokenInput.value = "";
    ui.tokenInput.focus();
  }

  ui.login.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = ui.tokenInput.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    ui.tokenInput.value = "";
    begin(parseFragment(location.hash).get("session") || null);
  });

  /** Switches the terminal to `sessionId` (detaching from the current one). */
  function openSession(sessionId, resumeToken) {
    if (link) link.detach();
    term.reset();
    term.options.disableStdin = false;
    clearNotices();
    setFragment(sessionId);
    link = new SessionLink(sessionId, resumeToken);
    link.start();
    refreshSessions();
  }

  async function createSession(attempt) {
    if (creating) return;
    creating = true;
    if (link) { link.detach(); link = null; }
    setState("connecting");
    status.sessionId = null;
    ui.sessionLabel.textContent = "";
    fitNow();
    try {
      const s = await api("POST", "api/v1/sessions", {
        tty: true,
        size: { cols: term.cols, rows: term.rows },
      });
      creating = false;
      openSession(s.id, s.resume_token);
    } catch (err) {
      creating = false;
      if (err instanceof ApiError) {
        if (err.status === 401) { askForToken("The gateway did not accept the token."); return; }
        if (err.status < 500 && err.status !== 429) {
          setState("failed");
          notice("cannot create a session: " + err.message, "error");
          return;
        }
      }
      // Network error, 5xx or 429: the gateway may be starting or busy.
      const n = attempt || 0;
      const delay = Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** n);
      if (n === 0) notice("cannot create a session yet (" + err.message + "); retrying.");
      setTimeout(() => { if (!link) createSession(n + 1); }, delay);
    }
  }

  async function refreshSessions() {
    if (!getToken()) return;
    let items;
    try {
      items = (await api("GET", "api/v1/sessions")).items || [];
    } catch (_) {
      return; // the list is a convenience; the link reports real trouble
    }
    const current = link ? link.id : "";
    const options = [new Option("sessions…", "")];
    for (const s of items) {
      const cmd = s.command ? s.command.join(" ") : "shell";
      const label = s.id + " · " + s.state + " · " + cmd + (s.id === current ? " (this tab)" : "");
      const opt = new Option(label, s.id);
      opt.disabled = s.id === current || s.state === "closed";
      options.push(opt);
    }
    ui.sessions.replaceChildren(...options);
    ui.sessions.value = "";
  }

  ui.sessions.addEventListener("focus", refreshSessions);
  ui.sessions.addEventListener("change", () => {
    const id = ui.sessions.value;
    ui.sessions.value = "";
    if (id && (!link || link.id !== id)) openSession(id, null);
  });
  ui.newSession.addEventListener("click", () => createSession(0));

  window.addEventListener("online", () => { if (link) link.retryNow(); });
  // A pasted #token=... or #session=... while the page is open: take the
  // token (new connections use it) and switch sessions when asked to.
  window.addEventListener("hashchange", () => {
    const frag = readFragment();
    if (status.state === "login" && getToken()) begin(frag.session);
    else if (frag.session && (!link || link.id !== frag.session)) begin(frag.session);
  });

  function begin(sessionId) {
    if (!getToken()) { askForToken(); return; }
    showTerminal();
    if (sessionId) openSession(sessionId, null);
    else createSession(0);
  }

  begin(initialFragment.session);
})();
