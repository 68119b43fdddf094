"""Configuration as data: frozen dataclass trees built once, at the edge.

Every setting of ``podterm serve`` (and of ``podterm agent`` and the client
commands) comes from four layers, highest first::

    --flag  >  PODTERM_<FLAG> environment variable  >  TOML config file  >  default

The result is a tree of frozen, slotted dataclasses (:class:`ServeConfig`,
:class:`AgentConfig`, :class:`ClientOptions`); components receive only their
branch of it.  Nothing below ``podterm.cli`` reads ``os.environ``: the CLI
passes the environment in, which is also what lets tests hand in a dict.

Names.  Each setting has one *key*, spelled like its flag without the dashes
(``grace``, ``tls-cert``, ``max-sessions``).  Its environment variable is
``PODTERM_`` + the key upper-cased with dashes as underscores
(``PODTERM_GRACE``, ``PODTERM_TLS_CERT``).  In the TOML file a setting may be
written by its key at the top level (``grace = "10m"``) or inside its section
table (``[sessions]`` ``grace = "10m"``); dashes and underscores in file keys
are interchangeable.  The tables are documented in ``docs/cli.md``, which is
the normative reference; :data:`SERVE_SETTINGS` and friends are the source
both the argument parser and that document follow.

Values.  Durations read like ``90s``, ``10m``, ``1h30m`` (:mod:`podterm.durations`);
sizes are a byte count or a number with ``KiB``, ``MiB``, ``GiB``; booleans
are ``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off`` in the
environment).  Relative paths in a config file are relative to the file's
directory (as kubeconfig does); in flags and variables, to the working
directory.  An empty environment variable counts as unset.

Error handling.  An unknown file key, a malformed value, a number out of range
or an inconsistent combination raises :class:`~podterm.errors.ConfigError`
whose message names where the value came from (``--grace``,
``PODTERM_GRACE``, ``serve.toml: sessions.grace``), the value, and what is
allowed.  Unknown ``PODTERM_*`` variables are ignored on purpose: Kubernetes
injects ``PODTERM_PORT``, ``PODTERM_SERVICE_HOST`` and friends into every pod
of a namespace that has a Service named ``podterm`` (service links), and a
gateway must not refuse to start because of them.  No setting's variable may
collide with those names (a unit test checks).
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from podterm.durations import DURATION_HELP, format_duration, parse_duration
from podterm.errors import ConfigError
from podterm.net.hostport import join_host_port, split_host_port
from podterm.protocol.handshake import OriginPolicy

__all__ = [
    "KiB", "MiB", "GiB",
    "ListenConfig", "TLSConfig", "LimitsConfig", "SessionsConfig", "StoreConfig",
    "AuthConfig", "SecurityConfig", "AuditConfig", "RecordingConfig", "UpstreamConfig",
    "WorkersConfig", "ClusterConfig",
    "LoggingConfig", "ServeConfig", "AgentConfig", "ClientOptions",
    "ReplayOptions", "KubeconfigOptions", "CertsInitOptions", "PolicyCheckOptions",
    "BenchOptions",
    "Setting", "SERVE_SETTINGS", "AGENT_SETTINGS", "CLIENT_SETTINGS",
    "DEFAULT_PORT", "DEFAULT_SERVER", "UPSTREAM_KINDS", "LOG_FORMATS", "LOG_LEVELS",
    "GC_PROFILES", "AUDIT_FULL_POLICIES", "OUTPUT_FORMATS", "STORE_SCHEMES",
    "load_serve_config", "load_agent_config", "load_client_options",
    "client_config_path", "default_recordings_dir", "parse_size", "parse_target",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: The gateway's default port: unassigned by IANA and unused by anything
#: Kubernetes ships, so a developer's `podterm serve` rarely collides.
DEFAULT_PORT = 7780
#: Where client commands look for a gateway when nothing says otherwise: the
#: embedded default that ``podterm serve`` starts with no flags.
DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PORT}"

UPSTREAM_KINDS = ("local", "kube", "agent")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
GC_PROFILES = ("default", "throughput", "low-latency")
AUDIT_FULL_POLICIES = ("block", "fail-closed")
OUTPUT_FORMATS = ("table", "wide", "json")
STORE_SCHEMES = ("memory", "sqlite", "redis", "rediss")


# ---------------------------------------------------------------------------
# The serve tree
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where the gateway listens and whom it believes about client addresses."""

    host: str = "127.0.0.1"  # loopback: a first run must not expose a shell to the network
    port: int = DEFAULT_PORT  # 0 picks a free port (tests, --ready-file tells which)
    #: Expect a PROXY protocol v1/v2 header on every connection (L4 load balancers).
    proxy_protocol: bool = False
    #: CIDRs of the proxies in front of the gateway.  A PROXY header (with
    #: proxy_protocol on) is believed from a peer inside them, and from *any*
    #: peer when this is empty (the listener requires the header, so only the
    #: balancer can reach it).  X-Forwarded-For is believed only from inside
    #: them: empty = from no one, so a client can never spoof its address by default.
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """HTTPS/WSS; all ``None`` means plain HTTP."""

    cert_file: str | None = None
    key_file: str | None = None
    #: Accept client certificates signed by this CA (CN = user, O = groups).
    client_ca_file: str | None = None

    @property
    def enabled(self) -> bool:
        """True when the gateway serves TLS."""
        return self.cert_file is not None


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Per-connection and per-process bounds.  Every one is finite."""

    #: 1 MiB: the k8s exec spec's suggested bound; kubectl sends at most 32 KiB + 1
    #: per message and podterm.v1 messages are far smaller (protocol/frame.py).
    max_frame_bytes: int = 1 * MiB
    #: Same as a frame: terminals never need fragmented messages larger than that.
    max_message_bytes: int = 1 * MiB
    #: TCP accept → WebSocket upgrade done (TLS + HTTP head).  nginx allows 60 s for
    #: a header; we allow less because a pending handshake holds one of the 20,000
    #: descriptors (slowloris), and 10 s still covers a TLS handshake at 1 s RTT.
    handshake_timeout_s: float = 10.0
    #: Per worker process.  The process is capped at 20,000 descriptors
    #: (ARCHITECTURE.md); an attached session costs two (client socket + PTY or
    #: upstream socket), so 9,000 leaves ~10% for listeners, store, logs and audit.
    max_sessions: int = 9000
    #: 64: a person uses a handful; scripts a few dozen; one runaway loop must not
    #: take a worker's whole budget.  0 = no per-user bound (max_sessions still holds).
    max_sessions_per_user: int = 64
    #: 256: an office or a CI fleet behind one NAT address shares this bound; it
    #: stops one host from exhausting descriptors.  0 = no per-address bound.
    max_connections_per_ip: int = 256
    #: HTTP request head + body.  The head is bounded separately at 64 KiB at most
    #: (h11 bounds an incomplete event at 16 KiB by default; OIDC bearer tokens can be
    #: 8 KiB alone).  The body must hold a create request whose ``command`` is at the
    #: protocol's 64 KiB limit once JSON-escaped (up to 6x for control bytes), so
    #: 256 KiB; larger bodies are refused with 413.
    max_request_bytes: int = 256 * KiB


@dataclass(frozen=True, slots=True)
class SessionsConfig:
    """How sessions outlive connections (spec/podterm-protocol.md)."""

    #: 10 min: spec/cli.md's default; long enough for a laptop lid or a train tunnel.
    grace_s: float = 600.0
    #: 1 MiB per session: ARCHITECTURE.md's default ring (~ 10 screens of dense
    #: output x 100); 10,000 sessions then hold at most ~10 GiB across workers.
    ring_bytes: int = 1 * MiB
    #: 256 KiB: spec/podterm-protocol.md "Flow control" default credit window.
    window_bytes: int = 256 * KiB
    #: 15 s: spec "Heartbeats"; below the 60 s idle timeout of common cloud LBs
    #: even after two missed pongs (30 s).
    heartbeat_interval_s: float = 15.0
    #: End a session without input or output for this long; 0 = off.
    idle_timeout_s: float = 0.0
    #: End any session this old; 0 = off.
    max_age_s: float = 0.0
    #: 25 s: Kubernetes' default terminationGracePeriodSeconds is 30 s; draining in
    #: 25 leaves 5 s to flush audit and exit 0 before the kubelet's SIGKILL.
    drain_timeout_s: float = 25.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Session store: ``memory://`` (default), ``sqlite:///path``, ``redis://host:port/db``."""

    url: str = "memory://"

    @property
    def scheme(self) -> str:
        """``"memory"``, ``"sqlite"``, ``"redis"`` or ``"rediss"`` (Redis over TLS)."""
        return urlsplit(self.url).scheme


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Who may connect and what they may do."""

    #: kube-apiserver static token CSV: token,user,uid,"group1,group2".
    token_file: str | None = None
    #: The embedded default's admin token (group podterm:admins); None = generate
    #: one at start.  Never shown by repr(), so logging a config cannot leak it.
    admin_token: str | None = field(default=None, repr=False)
    #: RBAC roles and bindings; without it only podterm:admins may act.
    policy_file: str | None = None
    #: OIDC bearer tokens (kube-apiserver's --oidc-* rules, podterm.auth.oidc):
    #: JWTs whose ``iss`` is this issuer, verified against ``oidc_jwks_file``
    #: (never fetched: the gateway makes no call to the issuer); None = off.
    oidc_issuer: str | None = None
    #: Accepted ``aud`` values (the client ids); at least one with an issuer.
    oidc_audiences: tuple[str, ...] = ()
    oidc_jwks_file: str | None = None
    oidc_username_claim: str = "sub"
    #: None: ``ISSUER#`` unless the claim is ``email``; ``"-"``: no prefix.
    oidc_username_prefix: str | None = None
    #: None: OIDC users have no groups.
    oidc_groups_claim: str | None = None
    oidc_groups_prefix: str = ""
    #: Kubernetes TokenReview for bearer tokens nothing else recognizes
    #: (service-account tokens), with the upstream's kubeconfig or in-cluster
    #: credentials.  Off by default: it sends every unknown token to the apiserver.
    tokenreview: bool = False
    #: ``spec.audiences`` to ask for; () = the apiserver's own.
    tokenreview_audiences: tuple[str, ...] = ()
    #: 2 min: kube-apiserver's --authentication-token-webhook-cache-ttl default.
    tokenreview_cache_ttl_s: float = 120.0
    #: A policy with ``delegate: subjectaccessreview`` asks Kubernetes
    #: (podterm.auth.sar); without this such a policy denies what it delegates.
    subjectaccessreview: bool = False


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """What browsers may do (protocol.handshake.OriginPolicy)."""

    #: Origins besides the gateway's own whose pages may open a WebSocket to it
    #: (CSWSH defence, RFC 6455 §10.2): exact origins or globs
    #: (``https://*.example.com``), ``*`` = any.  Clients that send no Origin
    #: (kubectl, the CLI, agents) are never affected.
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Audit events as JSON lines."""

    log_file: str | None = None
    #: What a full buffer does: "block" applies backpressure (sessions wait),
    #: "fail-closed" refuses new sessions.  Never "drop" (STYLE.md §7).
    full_policy: str = "block"
    #: 16,384 records (~8 MiB at ~500 B each): a mass reconnect of a full worker
    #: (9,000 sessions x auth + attach) fits with the writer a second behind.
    buffer_records: int = 16384


@dataclass(frozen=True, slots=True)
class RecordingConfig:
    """asciicast v2 recordings, one file per session; ``dir=None`` = off.

    :func:`load_serve_config` turns recording *on* by default (issue 6:
    "recording on by default"): ``dir`` defaults to
    :func:`default_recordings_dir`; ``--recordings off`` turns it off.  A
    ``RecordingConfig()`` built directly (embedding, tests) records nothing.
    """

    dir: str | None = None
    #: Off by default, as asciinema's --stdin: input includes passwords typed at
    #: prompts that the terminal never echoed.
    record_input: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Where shells run."""

    #: Default for sessions that do not name one (a session may name any upstream).
    kind: str = "local"
    #: kube upstream credentials; None = in-cluster config.  load_serve_config
    #: fills in $KUBECONFIG when it names a single file.
    kubeconfig: str | None = None
    context: str | None = None
    #: kube upstream: send Impersonate-User/-Group with the podterm user, so the
    #: apiserver's RBAC and audit see the real user.  Off by default (as
    #: KubeUpstreamOptions): the gateway's credential then needs the
    #: ``impersonate`` verb, without which every session would be refused.
    impersonate: bool = False
    #: kube upstream: restart a tty shell whose connection to the pod was lost
    #: in its last directory (SessionLimits.restore_upstreams); off, such a
    #: session ends ``upstream_failed``.
    restore: bool = True
    #: Shell for interactive local sessions.  load_serve_config fills in the
    #: gateway's $SHELL when it is set.
    shell: str = "/bin/sh"


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """Worker processes sharing the port (SO_REUSEPORT)."""

    #: 1 by default (docs/ha.md, Workers): more than one is asked for.  With
    #: the memory:// store the supervisor gives the workers a private SQLite
    #: file instead (a per-process store cannot be shared by workers).
    count: int = 1
    gc_profile: str = "default"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How peers (replicas and workers) reach each other (docs/ha.md, Peers)."""

    #: This process's peer address, HOST:PORT as the other peers dial it (the
    #: string stored as a session's and an agent's holder); None = the bound
    #: listener's address.
    advertise: str | None = None
    #: A secret every peer shares; requests for a session another peer holds
    #: are forwarded to it.  None: forwarding is off (such requests get 503).
    peer_secret_file: str | None = None


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    """Process logging (podterm.logs)."""

    format: str = "text"
    level: str = "info"
    #: Per-logger overrides from ``--log-level info,podterm.net=debug``.
    levels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything ``podterm serve`` runs with.  Built by :func:`load_serve_config`."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: Written once every listener is bound: JSON {"url", "token", "pid", "workers"}.
    ready_file: str | None = None


# ---------------------------------------------------------------------------
# The agent and the client
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``podterm agent`` runs with.  Built by :func:`load_agent_config`."""

    gateway: str
    namespace: str
    pod: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    #: Bearer token file (e.g. a projected service-account token), re-read on change.
    token_file: str | None = None
    container: str | None = None
    shell: str = "/bin/sh"
    #: Load-test mode: every stream echoes its input in process, no PTY.
    echo: bool = False
    ready_file: str | None = None
    #: Output kept per stream whatever the gateway acknowledged (1 MiB, as the
    #: gateway's session ring): what a gateway that adopts the stream after
    #: its first gateway died can still replay to the client.
    retain_bytes: int = 1 * MiB
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """What ``exec``/``attach``/``join``/``sessions``/``kill`` run with.

    The connection fields come from :func:`load_client_options` (flag > env >
    client config file > default); the command fields from that command's
    flags (see ``podterm.cli``).
    """

    server: str = DEFAULT_SERVER
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    insecure: bool = False
    # exec: target and command
    namespace: str | None = None  # None: the server's default namespace
    pod: str | None = None
    container: str | None = None
    command: tuple[str, ...] = ()  # () = interactive shell
    stdin: bool = False
    tty: bool = False
    upstream: str | None = None  # None: the server's default upstream
    # attach / join / kill
    session_id: str | None = None
    # sessions
    all_sessions: bool = False
    output: str = "table"
    #: The local $TERM, for the remote side of a tty session.
    term: str | None = None


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """``podterm replay FILE``."""

    file: str
    speed: float = 1.0
    idle_limit_s: float | None = None  # None = keep recorded pauses


@dataclass(frozen=True, slots=True)
class KubeconfigOptions:
    """``podterm kubeconfig``: a kubeconfig pointing kubectl at the gateway."""

    server: str = DEFAULT_SERVER
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    insecure: bool = False
    context_name: str = "podterm"
    #: A client certificate (PEM) and its key, embedded instead of a token.
    client_cert_file: str | None = None
    client_key_file: str | None = None


@dataclass(frozen=True, slots=True)
class CertsInitOptions:
    """``podterm certs init DIR``."""

    dir: str
    hosts: tuple[str, ...] = ()  # extra server names/IPs besides localhost, 127.0.0.1, ::1
    users: tuple[str, ...] = ()  # USER[:GROUP,...]; () = admin:podterm:admins, agent:podterm:agents
    force: bool = False  # replace existing files (and so make a new CA)


@dataclass(frozen=True, slots=True)
class PolicyCheckOptions:
    """``podterm policy check USER[:GROUP,...] VERB TARGET``."""

    user: str
    groups: tuple[str, ...]
    verb: str
    target: str
    policy_file: str | None = None


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """``podterm bench KIND [ARGS...]``; ``args`` go to the benchmark unparsed."""

    kind: str
    args: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# Value parsers: (raw value, where it came from) -> typed value, or ConfigError
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Source:
    """Where a raw value came from: names it in errors, anchors relative paths."""

    origin: str  # "--grace", "PODTERM_GRACE", "serve.toml: sessions.grace"
    base_dir: Path | None = None  # the config file's directory, for relative paths


_Coerce = Callable[[object, _Source], object]


def _bad(src: _Source, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"{src.origin}: invalid value {value!r}: expected {allowed}")


def _text(value: object, src: _Source, allowed: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(src, value, allowed)
    return value


def _str_value(value: object, src: _Source) -> object:
    return _text(value, src, "a non-empty string")


def _path(value: object, src: _Source) -> object:
    text = _text(value, src, "a file or directory path")
    if "\0" in text:
        raise _bad(src, value, "a file or directory path")
    if src.base_dir is not None and not os.path.isabs(text):
        return str(src.base_dir / text)
    return text


def _recordings_dir(value: object, src: _Source) -> object:
    """A recordings directory, or ``off`` (TOML: ``false``) for no recordings (None)."""
    if value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    return _path(value, src)


def default_recordings_dir(env: Mapping[str, str]) -> str | None:
    """Where recordings go when nothing says: the user's state directory.

    ``$XDG_STATE_HOME/podterm/recordings`` (the XDG base directory spec's
    place for state that should persist, such as logs and history), else
    ``$HOME/.local/state/podterm/recordings``; None when neither is set (then
    recording is off unless ``--recordings`` names a directory).  The gateway
    creates it ``0700`` and each file ``0600``.
    """
    state = env.get("XDG_STATE_HOME", "")
    if state and os.path.isabs(state):  # the spec: relative values are ignored
        return str(Path(state) / "podterm" / "recordings")
    home = env.get("HOME", "")
    if home and os.path.isabs(home):
        return str(Path(home) / ".local" / "state" / "podterm" / "recordings")
    return None


def _bool(value: object, src: _Source) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    raise _bad(src, value, "true or false")


def _choice(*allowed: str, lower: bool = False) -> _Coerce:
    def coerce(value: object, src: _Source) -> object:
        text = value.lower() if lower and isinstance(value, str) else value
        if text not in allowed:
            raise _bad(src, value, "one of " + ", ".join(allowed))
        return text

    return coerce


def _int(lo: int, hi: int, what: str = "an integer") -> _Coerce:
    def coerce(value: object, src: _Source) -> object:
        allowed = f"{what} from {lo} to {hi}"
        if isinstance(value, bool):
            raise _bad(src, value, allowed)
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
            number = int(value)
        elif isinstance(value, int):
            number = value
        else:
            raise _bad(src, value, allowed)
        if not lo <= number <= hi:
            raise _bad(src, value, allowed)
        return number

    return coerce


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; the machine's count elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


_worker_count = _int(1, 1024)


def _workers(value: object, src: _Source) -> object:
    """``--workers``: 1..1024, or ``auto`` (one per usable CPU: issue 9's one per core)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return min(1024, usable_cpus())
    return _worker_count(value, src)


_SIZE_UNITS = {"": 1, "b": 1, "kib": KiB, "mib": MiB, "gib": GiB}
_SIZE = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``65536``, ``"64KiB"``, ``"1MiB"``, ``"2GiB"``.

    Only binary units are accepted; ``"1MB"`` is refused rather than guessed.

    Raises:
        ValueError: not a size.
    """
    if isinstance(text, bool):
        raise ValueError("a boolean is not a size")
    if isinstance(text, int):
        if text < 0:
            raise ValueError("negative size")
        return text
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _size(lo: int, hi: int) -> _Coerce:
    def coerce(value: object, src: _Source) -> object:
        allowed = f"a size from {_fmt_size(lo)} to {_fmt_size(hi)} (bytes, or KiB, MiB, GiB)"
        try:
            number = parse_size(value)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise _bad(src, value, allowed) from None
        if not lo <= number <= hi:
            raise _bad(src, value, allowed)
        return number

    return coerce


def _fmt_size(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _duration(lo: float, hi: float) -> _Coerce:
    def coerce(value: object, src: _Source) -> object:
        allowed = f"{DURATION_HELP}, from {format_duration(lo)} to {format_duration(hi)}"
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value != 0:  # TOML `grace = 600`: seconds or milliseconds?
                raise ConfigError(f"{src.origin}: invalid duration {value!r} (no unit; "
                                  f"write '{value}s' if seconds are meant): expected {allowed}")
            seconds = 0.0
        else:
            try:
                seconds = parse_duration(value)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ConfigError(
                    f"{src.origin}: invalid duration {value!r} ({exc}): expected {allowed}"
                ) from None
        if not lo <= seconds <= hi:
            raise _bad(src, value, allowed)
        return seconds

    return coerce


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return _HOSTNAME.fullmatch(text) is not None


def _host(value: object, src: _Source) -> object:
    allowed = "an IP address or host name, e.g. 127.0.0.1, ::1, 0.0.0.0"
    text = _text(value, src, allowed)
    text = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if not _is_host(text):
        raise _bad(src, value, allowed)
    return text


_port = _int(0, 65535, "a port")


def _listen(value: object, src: _Source) -> object:
    allowed = "HOST:PORT, e.g. 127.0.0.1:7780, 0.0.0.0:443 or [::1]:7780 (port 0 picks a free one)"
    text = _text(value, src, allowed)
    try:
        host, port = split_host_port(text)
    except ValueError:
        raise _bad(src, value, allowed) from None
    if not _is_host(host) or not 0 <= port <= 65535:
        raise _bad(src, value, allowed)
    return (host, port)


def _advertise(value: object, src: _Source) -> object:
    """A peer address: ``HOST:PORT`` (port 1-65535), IPv6 in brackets; kept as text."""
    allowed = "HOST:PORT as peers reach this gateway, e.g. 10.0.0.7:7780 or [fd00::7]:7780"
    pair = _listen(value, src)
    assert isinstance(pair, tuple)
    host, port = str(pair[0]), int(pair[1])
    if port == 0:
        raise _bad(src, value, allowed)
    return join_host_port(host, port)


def _cidrs(value: object, src: _Source) -> object:
    allowed = "a comma-separated list of CIDRs, e.g. 10.0.0.0/8,fd00::/8"
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = [item.strip() for item in value]
    else:
        raise _bad(src, value, allowed)
    networks = []
    for item in items:
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"{src.origin}: invalid CIDR {item!r}: expected {allowed}") from None
    return tuple(networks)


def _items(value: object) -> list[str] | None:
    """A list from a comma-separated string, a TOML array, or repeated flags."""
    parts = [value] if isinstance(value, str) else value
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        return None
    return [item.strip() for part in parts for item in part.split(",") if item.strip()]


def _names(what: str) -> _Coerce:
    def coerce(value: object, src: _Source) -> object:
        items = _items(value)
        if not items or not all(_TOKEN_TEXT.fullmatch(item) for item in items):
            raise _bad(src, value, f"a comma-separated list, each {what} without spaces")
        return tuple(items)

    return coerce


_TOKEN_TEXT = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # visible ASCII but ','


def _origins(value: object, src: _Source) -> object:
    allowed = ("a comma-separated list of origins such as https://console.example.com, "
               "globs such as https://*.example.com or http://localhost:*, '*' or 'null'")
    items = _items(value)
    if items is None:
        raise _bad(src, value, allowed)
    for item in items:
        try:
            OriginPolicy([item])
        except ValueError:
            raise ConfigError(f"{src.origin}: invalid origin {item!r}: expected {allowed}"
                              ) from None
    return tuple(items)


def _store_url(value: object, src: _Source) -> object:
    allowed = "memory://, sqlite:///ABSOLUTE/PATH or redis[s]://HOST[:PORT][/DB]"
    text = _text(value, src, allowed)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _bad(src, value, allowed) from None
    if parts.scheme == "memory" and text.rstrip("/") == "memory:":
        return "memory://"
    if parts.scheme == "sqlite" and not parts.netloc and parts.path not in ("", "/"):
        return text
    if parts.scheme in ("redis", "rediss") and parts.hostname:
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise _bad(src, value, allowed + " (DB is a number)")
        return text
    raise _bad(src, value, allowed)


def _http_url(value: object, src: _Source) -> object:
    allowed = "an http:// or https:// URL, e.g. https://podterm.example.com"
    text = _text(value, src, allowed)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise _bad(src, value, allowed) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise _bad(src, value, allowed)
    return text.rstrip("/")


def _token(value: object, src: _Source) -> object:
    # Visible ASCII only: a token ends up in an HTTP header, where CR/LF would
    # inject headers and spaces would split it.
    allowed = "a token of visible ASCII characters (no spaces)"
    text = _text(value, src, allowed)
    if not all(0x21 <= ord(ch) <= 0x7E for ch in text):
        # Never echo a secret back: say what is wrong, not what it was.
        raise ConfigError(f"{src.origin}: invalid token: expected {allowed}")
    return text


def _admin_token(value: object, src: _Source) -> object:
    text = _token(value, src)
    assert isinstance(text, str)
    if len(text) < 16:
        raise ConfigError(f"{src.origin}: admin token too short: expected at least 16 characters")
    return text


_LOGGER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _log_level(value: object, src: _Source) -> object:
    allowed = ("a level (" + ", ".join(LOG_LEVELS) + "), optionally followed by "
               "per-logger levels: info,podterm.net=debug")
    text = _text(value, src, allowed).strip().lower()
    level = "info"
    overrides: list[tuple[str, str]] = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        name, sep, lvl = part.rpartition("=")
        if lvl not in LOG_LEVELS:
            raise _bad(src, value, allowed)
        if sep:
            if not _LOGGER_NAME.fullmatch(name):
                raise _bad(src, value, allowed)
            overrides.append((name, lvl))
        elif i == 0:
            level = lvl
        else:
            raise _bad(src, value, allowed)
    return (level, tuple(overrides))


# ---------------------------------------------------------------------------
# The settings tables
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One configurable value and every name it goes by.

    Attributes:
        key: the flat key, i.e. the flag without dashes (``"tls-cert"``).
        targets: dotted dataclass fields it sets (``"tls.cert_file"``); two
            for ``listen`` (host and port), whose parser returns a pair.
        help: one line for ``--help`` and docs/cli.md.
        metavar: the flag's value name (``FILE``, ``DURATION``).
        flag: there is a ``--key`` flag (otherwise env and file only).
        env: there is a ``PODTERM_KEY`` variable.
        flat: the file accepts ``key = ...`` at the top level.
        section, table_key: the file accepts ``[section] table_key = ...``.
        is_bool: the flag is a switch (``--x`` / ``--no-x``), not a value.
    """

    key: str
    targets: tuple[str, ...]
    coerce: _Coerce = field(repr=False)
    help: str
    metavar: str | None = None
    flag: bool = True
    env: bool = True
    flat: bool = True
    section: str | None = None
    table_key: str | None = None
    is_bool: bool = False
    #: The flag may be given several times (argparse ``append``); the values add up.
    repeatable: bool = False

    @property
    def flag_name(self) -> str:
        return "--" + self.key

    @property
    def env_name(self) -> str:
        return "PODTERM_" + self.key.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        """The argparse destination (and the mapping key load_* accepts)."""
        return self.key.replace("-", "_")

    @property
    def file_keys(self) -> tuple[str, ...]:
        """The spellings accepted in a config file."""
        keys = [self.key] if self.flat else []
        if self.section and self.table_key:
            keys.append(f"{self.section}.{self.table_key}")
        return tuple(keys)


def _s(key: str, targets: str | tuple[str, ...], coerce: _Coerce, help: str, *,
       metavar: str | None = None, flag: bool = True, env: bool = True, flat: bool = True,
       table: str | None = None, is_bool: bool = False, repeatable: bool = False) -> Setting:
    """Shorthand: ``table="sessions.grace"`` names the section and key in the file."""
    section, _, table_key = table.partition(".") if table else (None, "", None)
    return Setting(key=key, targets=(targets,) if isinstance(targets, str) else targets,
                   coerce=coerce, help=help, metavar=metavar, flag=flag, env=env, flat=flat,
                   section=section, table_key=table_key or None, is_bool=is_bool,
                   repeatable=repeatable)


_secs = _duration  # readability in the tables below
_DAY = 86400.0

#: Every setting of ``podterm serve``, in the order ``--help`` shows them.
SERVE_SETTINGS: tuple[Setting, ...] = (
    _s("listen", ("listen.host", "listen.port"), _listen,
       "listener address; port 0 picks a free one (default 127.0.0.1:7780)", metavar="HOST:PORT"),
    _s("listen-host", "listen.host", _host, "listener host", flag=False, env=False, flat=False,
       table="listen.host"),
    _s("listen-port", "listen.port", _port, "listener port", flag=False, env=False, flat=False,
       table="listen.port"),
    _s("proxy-protocol", "listen.proxy_protocol", _bool,
       "expect a PROXY protocol v1/v2 header on every connection",
       table="listen.proxy-protocol", is_bool=True),
    _s("trusted-proxies", "listen.trusted_proxies", _cidrs,
       "CIDRs of trusted proxies: PROXY headers are believed from them (default: any "
       "peer), X-Forwarded-For only from them (default: no one)", metavar="CIDR,...",
       table="listen.trusted-proxies"),
    _s("tls-cert", "tls.cert_file", _path, "serve HTTPS/WSS with this certificate (PEM)",
       metavar="FILE", table="tls.cert"),
    _s("tls-key", "tls.key_file", _path, "private key for --tls-cert (PEM)", metavar="FILE",
       table="tls.key"),
    _s("client-ca", "tls.client_ca_file", _path,
       "accept client certificates signed by this CA (CN = user, O = groups)", metavar="FILE",
       table="tls.client-ca"),
    _s("max-frame-bytes", "limits.max_frame_bytes", _size(125, 64 * MiB),
       "largest WebSocket frame accepted (default 1MiB)", flag=False,
       table="limits.max-frame-bytes"),
    _s("max-message-bytes", "limits.max_message_bytes", _size(125, 64 * MiB),
       "largest WebSocket message accepted (default 1MiB)", flag=False,
       table="limits.max-message-bytes"),
    _s("handshake-timeout", "limits.handshake_timeout_s", _secs(0.1, 300.0),
       "bound on TCP accept to WebSocket upgrade (default 10s)", flag=False,
       table="limits.handshake-timeout"),
    _s("max-sessions", "limits.max_sessions", _int(1, 1_000_000),
       "sessions per worker process (default 9000)", flag=False, table="limits.max-sessions"),
    _s("max-sessions-per-user", "limits.max_sessions_per_user", _int(0, 1_000_000),
       "sessions per user, 0 = unbounded (default 64)", flag=False,
       table="limits.max-sessions-per-user"),
    _s("max-connections-per-ip", "limits.max_connections_per_ip", _int(0, 1_000_000),
       "concurrent connections per client address, 0 = unbounded (default 256)", flag=False,
       table="limits.max-connections-per-ip"),
    _s("max-request-bytes", "limits.max_request_bytes", _size(4 * KiB, 16 * MiB),
       "HTTP request head + body (default 64KiB)", flag=False,
       table="limits.max-request-bytes"),
    _s("grace", "sessions.grace_s", _secs(0.0, 30 * _DAY),
       "how long a detached session waits for its client (default 10m)", metavar="DURATION",
       table="sessions.grace"),
    _s("ring-bytes", "sessions.ring_bytes", _size(4 * KiB, 1 * GiB),
       "output kept per session for resume (default 1MiB)", flag=False,
       table="sessions.ring-bytes"),
    _s("window-bytes", "sessions.window_bytes", _size(1 * KiB, 1 * GiB),
       "unacknowledged bytes in flight per link (default 256KiB)", flag=False,
       table="sessions.window-bytes"),
    _s("heartbeat-interval", "sessions.heartbeat_interval_s", _secs(1.0, 3600.0),
       "WebSocket ping interval; two missed pongs = dead (default 15s)", flag=False,
       table="sessions.heartbeat-interval"),
    _s("idle-timeout", "sessions.idle_timeout_s", _secs(0.0, 365 * _DAY),
       "end sessions idle this long, 0 = off (default 0)", flag=False,
       table="sessions.idle-timeout"),
    _s("max-age", "sessions.max_age_s", _secs(0.0, 365 * _DAY),
       "end sessions this old, 0 = off (default 0)", flag=False, table="sessions.max-age"),
    _s("drain-timeout", "sessions.drain_timeout_s", _secs(0.0, 3600.0),
       "bound on the drain after SIGTERM (default 25s)", metavar="DURATION",
       table="sessions.drain-timeout"),
    _s("store", "store.url", _store_url,
       "session store: memory:// (default), sqlite:///PATH, redis://HOST:PORT/DB",
       metavar="URL", table="store.url"),
    _s("token-file", "auth.token_file", _path,
       'static token CSV as kube-apiserver reads it: token,user,uid,"group1,group2"',
       metavar="FILE", table="auth.token-file"),
    _s("admin-token", "auth.admin_token", _admin_token,
       "the admin token (group podterm:admins) instead of a generated one", flag=False,
       table="auth.admin-token"),
    _s("policy", "auth.policy_file", _path,
       "RBAC roles and bindings (default: only podterm:admins may act)", metavar="FILE",
       table="auth.policy"),
    _s("oidc-issuer", "auth.oidc_issuer", _str_value,
       "accept OIDC JWTs whose iss is exactly this issuer URL (needs --oidc-audiences and "
       "--oidc-jwks-file)", metavar="URL", table="auth.oidc-issuer"),
    _s("oidc-audiences", "auth.oidc_audiences", _names("an OIDC client id"),
       "accepted aud values of OIDC tokens (the client ids)", metavar="ID,...",
       table="auth.oidc-audiences"),
    _s("oidc-jwks-file", "auth.oidc_jwks_file", _path,
       "the OIDC issuer's JWKS, re-read when it changes", metavar="FILE",
       table="auth.oidc-jwks-file"),
    _s("oidc-username-claim", "auth.oidc_username_claim", _str_value,
       "OIDC claim naming the user (default sub)", flag=False,
       table="auth.oidc-username-claim"),
    _s("oidc-username-prefix", "auth.oidc_username_prefix", _str_value,
       "prefix of OIDC user names; - = none (default ISSUER# unless the claim is email)",
       flag=False, table="auth.oidc-username-prefix"),
    _s("oidc-groups-claim", "auth.oidc_groups_claim", _str_value,
       "OIDC claim listing the groups (default: no groups)", flag=False,
       table="auth.oidc-groups-claim"),
    _s("oidc-groups-prefix", "auth.oidc_groups_prefix", _str_value,
       "prefix of OIDC group names (default none)", flag=False,
       table="auth.oidc-groups-prefix"),
    _s("tokenreview", "auth.tokenreview", _bool,
       "ask the Kubernetes API (TokenReview) about bearer tokens nothing else recognizes, "
       "with --kubeconfig or in-cluster credentials (default false)",
       table="auth.tokenreview", is_bool=True),
    _s("tokenreview-audiences", "auth.tokenreview_audiences", _names("an audience"),
       "audiences TokenReview asks for (default: the apiserver's)", flag=False,
       table="auth.tokenreview-audiences"),
    _s("tokenreview-cache-ttl", "auth.tokenreview_cache_ttl_s", _secs(0.0, 3600.0),
       "how long an accepted token's review is reused (default 2m)", flag=False,
       table="auth.tokenreview-cache-ttl"),
    _s("subjectaccessreview", "auth.subjectaccessreview", _bool,
       "let a policy with 'delegate: subjectaccessreview' ask the Kubernetes API, with "
       "--kubeconfig or in-cluster credentials (default false)",
       table="auth.subjectaccessreview", is_bool=True),
    _s("allowed-origins", "security.allowed_origins", _origins,
       "browser origins besides the gateway's own whose pages may open WebSockets: "
       "exact, or globs such as https://*.example.com; * = any; repeatable",
       metavar="ORIGIN,...", table="security.allowed-origins", repeatable=True),
    _s("audit-log", "audit.log_file", _path, "write audit events as JSON lines to FILE",
       metavar="FILE", table="audit.log"),
    _s("audit-full-policy", "audit.full_policy", _choice(*AUDIT_FULL_POLICIES),
       "what a full audit buffer does: block (default) or fail-closed",
       metavar="block|fail-closed", table="audit.full-policy"),
    _s("audit-buffer-records", "audit.buffer_records", _int(64, 10_000_000),
       "audit records buffered before the full policy applies (default 16384)", flag=False,
       table="audit.buffer-records"),
    _s("recordings", "recording.dir", _recordings_dir,
       "write an asciicast v2 recording per session into DIR, or off (default "
       "$XDG_STATE_HOME/podterm/recordings, else ~/.local/state/podterm/recordings)",
       metavar="DIR|off", table="recording.dir"),
    _s("record-input", "recording.record_input", _bool,
       "also record input (default false: input holds unechoed passwords)",
       table="recording.record-input", is_bool=True),
    _s("upstream", "upstream.kind", _choice(*UPSTREAM_KINDS),
       "default upstream for sessions that do not name one (default local)",
       metavar="local|kube|agent", table="upstream.kind"),
    _s("kubeconfig", "upstream.kubeconfig", _path,
       "kube upstream credentials (default: in-cluster config)", metavar="FILE",
       table="upstream.kubeconfig"),
    _s("context", "upstream.context", _str_value, "kubeconfig context for the kube upstream",
       metavar="NAME", table="upstream.context"),
    _s("impersonate", "upstream.impersonate", _bool,
       "kube upstream: act as the podterm user (Impersonate-User/-Group), so the apiserver's "
       "RBAC and audit see them; the gateway's credential needs the impersonate verb "
       "(default false)", table="upstream.impersonate", is_bool=True),
    _s("restore-shells", "upstream.restore", _bool,
       "kube upstream: when a tty shell's connection to the pod is lost, start a new shell "
       "in its last directory on the next input (default true)", table="upstream.restore",
       is_bool=True),
    _s("shell", "upstream.shell", _path,
       "shell for interactive local sessions (default $SHELL, then /bin/sh)", flag=False,
       table="upstream.shell"),
    _s("workers", "workers.count", _workers,
       "worker processes sharing the port (SO_REUSEPORT) under one supervisor; 'auto' = one "
       "per CPU this process may run on (default 1)",
       metavar="N|auto", table="workers.count"),
    _s("advertise", "cluster.advertise", _advertise,
       "this gateway's address as its peers reach it, stored as the holder of its sessions "
       "(default: the listener's address)", metavar="HOST:PORT", table="cluster.advertise"),
    _s("peer-secret-file", "cluster.peer_secret_file", _path,
       "secret shared by every peer (at least 16 bytes): requests for a session another "
       "peer holds are forwarded to it (default: off, 503)", metavar="FILE",
       table="cluster.peer-secret-file"),
    _s("gc-profile", "workers.gc_profile", _choice(*GC_PROFILES),
       "GC tuning: default, throughput or low-latency",
       metavar="default|throughput|low-latency", table="workers.gc-profile"),
    _s("log-format", "logging.format", _choice(*LOG_FORMATS, lower=True),
       "log format (default text)", metavar="json|text", table="logging.format"),
    _s("log-level", ("logging.level", "logging.levels"), _log_level,
       "log level, optionally per logger: info,podterm.net=debug (default info)",
       metavar="LEVEL", table="logging.level"),
    _s("ready-file", "ready_file", _path,
       'write {"url", "token", "pid", "workers"} as JSON once every listener is bound',
       metavar="FILE"),
)

#: Every setting of ``podterm agent``.
AGENT_SETTINGS: tuple[Setting, ...] = (
    _s("gateway", "gateway", _http_url, "the gateway (or its load balancer), https:// or http://",
       metavar="URL"),
    _s("ca", "ca_file", _path, "CA that signed the gateway's certificate", metavar="FILE"),
    _s("cert", "cert_file", _path, "mutual TLS client certificate (PEM)", metavar="FILE"),
    _s("key", "key_file", _path, "private key for --cert (PEM)", metavar="FILE"),
    _s("token-file", "token_file", _path,
       "bearer token file (e.g. a projected service-account token), re-read on change",
       metavar="FILE"),
    _s("namespace", "namespace", _str_value,
       "pod namespace it registers (default $POD_NAMESPACE)", metavar="NS"),
    _s("pod", "pod", _str_value, "pod name it registers (default $POD_NAME)", metavar="NAME"),
    _s("container", "container", _str_value, "default container name reported for its shells",
       metavar="NAME"),
    _s("shell", "shell", _path, "shell for interactive sessions (default $SHELL, then /bin/sh)",
       metavar="PATH"),
    _s("echo", "echo", _bool, "load-test mode: every stream echoes its input, no PTY",
       is_bool=True),
    _s("ready-file", "ready_file", _path, 'write {"gateway", "pid"} as JSON once registered',
       metavar="FILE"),
    _s("retain-bytes", "retain_bytes", _size(64 * KiB, 1 * GiB),
       "output kept per shell for a gateway that takes over after another died "
       "(default 1MiB; rounded up to 4 KiB)", metavar="SIZE"),
    _s("log-format", "logging.format", _choice(*LOG_FORMATS, lower=True),
       "log format (default text)", metavar="json|text", table="logging.format"),
    _s("log-level", ("logging.level", "logging.levels"), _log_level,
       "log level, optionally per logger (default info)", metavar="LEVEL",
       table="logging.level"),
)

#: The connection settings shared by every client command.
CLIENT_SETTINGS: tuple[Setting, ...] = (
    _s("server", "server", _http_url, f"the gateway URL (default {DEFAULT_SERVER})",
       metavar="URL"),
    _s("token", "token", _token, "bearer token (prefer PODTERM_TOKEN: flags show in ps)",
       metavar="TOKEN"),
    _s("ca", "ca_file", _path, "CA that signed the gateway's certificate", metavar="FILE"),
    _s("insecure-skip-tls-verify", "insecure", _bool,
       "do not verify the gateway's certificate (insecure)", is_bool=True),
)


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------

_Layer = dict[str, tuple[object, _Source]]  # target -> (typed value, where from)
_Flags = argparse.Namespace | Mapping[str, object]


def _apply(setting: Setting, raw: object, src: _Source, layer: _Layer) -> None:
    value = setting.coerce(raw, src)
    if len(setting.targets) == 1:
        layer[setting.targets[0]] = (value, src)
    else:
        assert isinstance(value, tuple) and len(value) == len(setting.targets)
        for target, part in zip(setting.targets, value, strict=True):
            layer[target] = (part, src)


def _flags_layer(settings: tuple[Setting, ...], flags: _Flags | None,
                 extra_keys: tuple[str, ...] = ()) -> _Layer:
    """Values given on the command line.

    A Namespace is the argparse result: attributes that are not settings
    (the subcommand, ``config``) are ignored, and absent flags are absent
    (the parser uses ``default=SUPPRESS``), so only what was typed counts.
    A Mapping is the programmatic form and is strict: an unknown key raises.
    """
    layer: _Layer = {}
    if flags is None:
        return layer
    by_dest = {s.dest: s for s in settings if s.flag}
    if isinstance(flags, argparse.Namespace):
        items = [(k, v) for k, v in vars(flags).items() if k in by_dest]
        strict = False
    else:
        items = [(k.replace("-", "_"), v) for k, v in flags.items()]
        strict = True
    for dest, raw in items:
        if raw is None:
            continue
        setting = by_dest.get(dest)
        if setting is None:
            if strict and dest not in extra_keys:
                raise ConfigError(_unknown("flag", "--" + dest.replace("_", "-"),
                                           [s.flag_name for s in by_dest.values()]))
            continue
        _apply(setting, raw, _Source(setting.flag_name), layer)
    return layer


def _env_layer(settings: tuple[Setting, ...], env: Mapping[str, str]) -> _Layer:
    layer: _Layer = {}
    for setting in settings:
        if setting.env:
            raw = env.get(setting.env_name)
            if raw:  # empty = unset, as shells make it easy to write FOO= cmd
                _apply(setting, raw, _Source(setting.env_name), layer)
    return layer


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: config file is a directory") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _unknown(what: str, name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {name!r}{hint}; allowed: {', '.join(sorted(allowed))}"


def _file_layer(settings: tuple[Setting, ...], path: Path) -> _Layer:
    data = _read_toml(path)
    base = _Source(str(path), path.resolve().parent)
    flat = {s.key: s for s in settings if s.flat}
    tables: dict[str, dict[str, Setting]] = {}
    for s in settings:
        if s.section and s.table_key:
            tables.setdefault(s.section, {})[s.table_key] = s
    layer: _Layer = {}
    seen: dict[str, str] = {}  # target -> file key that set it

    def put(setting: Setting, file_key: str, raw: object) -> None:
        for target in setting.targets:
            if target in seen:
                raise ConfigError(f"{path}: {file_key!r} and {seen[target]!r} set the same "
                                  "setting; keep one")
            seen[target] = file_key
        _apply(setting, raw, _Source(f"{path}: {file_key}", base.base_dir), layer)

    for raw_key, value in data.items():
        key = raw_key.replace("_", "-")
        if isinstance(value, dict) and key in tables:
            for raw_sub, sub_value in value.items():
                sub = raw_sub.replace("_", "-")
                setting = tables[key].get(sub)
                if setting is None:
                    raise ConfigError(f"{path}: " + _unknown(
                        f"key in [{key}]", sub, list(tables[key])))
                put(setting, f"{key}.{sub}", sub_value)
        elif key in flat:
            put(flat[key], key, value)
        elif key in tables:
            raise ConfigError(f"{path}: {key!r} must be a table ([{key}]) or one of the "
                              f"top-level keys; got {value!r}")
        else:
            raise ConfigError(f"{path}: " + _unknown("key", key, list(flat) + list(tables)))
    return layer


def _config_path(flags: _Flags | None, env: Mapping[str, str],
                 file_path: str | os.PathLike[str] | None) -> Path | None:
    """The config file: ``file_path``, else ``--config``, else ``PODTERM_CONFIG``."""
    if file_path is not None:
        return Path(file_path)
    if isinstance(flags, argparse.Namespace):
        given = getattr(flags, "config", None)
    elif flags is not None:
        given = flags.get("config")
    else:
        given = None
    if given:
        return Path(str(given))
    if env.get("PODTERM_CONFIG"):
        return Path(env["PODTERM_CONFIG"])
    return None


def _resolve(settings: tuple[Setting, ...], flags: _Flags | None, env: Mapping[str, str],
             path: Path | None, defaults: _Layer | None = None) -> _Layer:
    """Merge the layers, lowest first: defaults < file < env < flags."""
    merged: _Layer = dict(defaults or {})
    if path is not None:
        merged.update(_file_layer(settings, path))
    merged.update(_env_layer(settings, env))
    merged.update(_flags_layer(settings, flags, extra_keys=("config",)))
    return merged


def _group(merged: _Layer) -> dict[str, dict[str, object]]:
    """``{"sessions.grace_s": (v, src)}`` → ``{"sessions": {"grace_s": v}}``; top level under ""."""
    groups: dict[str, dict[str, object]] = {}
    for target, (value, _src) in merged.items():
        section, _, name = target.rpartition(".")
        groups.setdefault(section, {})[name] = value
    return groups


def _origin(merged: _Layer, target: str, settings: tuple[Setting, ...]) -> str:
    """Name where ``target`` came from, or its flag when it is a default."""
    if target in merged and merged[target][1].origin != "default":
        return merged[target][1].origin
    for s in settings:
        if target in s.targets:
            return s.flag_name if s.flag else s.env_name
    return target


# ---------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------


def load_serve_config(flags: _Flags | None, env: Mapping[str, str],
                      file_path: str | os.PathLike[str] | None = None) -> ServeConfig:
    """Build the :class:`ServeConfig` from flags > env > file > defaults.

    Args:
        flags: the argparse Namespace of ``podterm serve`` (only flags the user
            typed are present), or a mapping from setting key (``"grace"`` or
            ``"tls_cert"``) to a raw value; a mapping with an unknown key is an
            error.  Values may be strings as typed, or already typed (bool, int).
        env: the process environment (the CLI passes ``os.environ``).  Besides
            ``PODTERM_*`` it supplies defaults: ``SHELL`` (local shell),
            ``KUBECONFIG`` when it names one file, and ``XDG_STATE_HOME`` or
            ``HOME`` for the recordings directory (:func:`default_recordings_dir`).
        file_path: the TOML file; when None, ``--config`` in ``flags``, then
            ``PODTERM_CONFIG``; no file when none of them names one.

    Returns:
        The frozen configuration tree.

    Raises:
        ConfigError: unknown file key, malformed or out-of-range value, or an
            inconsistent combination; the message names key, value and what
            is allowed.
    """
    settings = SERVE_SETTINGS
    defaults: _Layer = {}
    if env.get("SHELL"):
        defaults["upstream.shell"] = (env["SHELL"], _Source("default"))
    # kubectl's variable, when it names one file.  A list (a:b) is something
    # kubectl merges; podterm reads one file, so a list is left to --kubeconfig.
    kubeconfig_env = env.get("KUBECONFIG", "")
    if kubeconfig_env and os.pathsep not in kubeconfig_env:
        defaults["upstream.kubeconfig"] = (kubeconfig_env, _Source("default"))
    # Recording is on by default (issue 6), into the user's state directory.
    recordings = default_recordings_dir(env)
    if recordings is not None:
        defaults["recording.dir"] = (recordings, _Source("default"))
    merged = _resolve(settings, flags, env, _config_path(flags, env, file_path), defaults)

    # Workers: 1 unless asked (docs/ha.md, Workers).  With memory://, which
    # lives in one process, the supervisor hands its workers a private SQLite
    # file instead (podterm.gateway.workers), so --workers N always works.

    groups = _group(merged)
    config = ServeConfig(
        listen=ListenConfig(**groups.get("listen", {})),  # type: ignore[arg-type]
        tls=TLSConfig(**groups.get("tls", {})),  # type: ignore[arg-type]
        limits=LimitsConfig(**groups.get("limits", {})),  # type: ignore[arg-type]
        sessions=SessionsConfig(**groups.get("sessions", {})),  # type: ignore[arg-type]
        store=StoreConfig(**groups.get("store", {})),  # type: ignore[arg-type]
        auth=AuthConfig(**groups.get("auth", {})),  # type: ignore[arg-type]
        security=SecurityConfig(**groups.get("security", {})),  # type: ignore[arg-type]
        audit=AuditConfig(**groups.get("audit", {})),  # type: ignore[arg-type]
        recording=RecordingConfig(**groups.get("recording", {})),  # type: ignore[arg-type]
        upstream=UpstreamConfig(**groups.get("upstream", {})),  # type: ignore[arg-type]
        workers=WorkersConfig(**groups.get("workers", {})),  # type: ignore[arg-type]
        cluster=ClusterConfig(**groups.get("cluster", {})),  # type: ignore[arg-type]
        logging=LoggingConfig(**groups.get("logging", {})),  # type: ignore[arg-type]
        **groups.get("", {}),  # type: ignore[arg-type]
    )
    _check_serve(config, merged)
    return config


def _check_serve(config: ServeConfig, merged: _Layer) -> None:
    """Rules that span settings; each error names both sides."""

    def name(target: str) -> str:
        return _origin(merged, target, SERVE_SETTINGS)

    tls = config.tls
    if (tls.cert_file is None) != (tls.key_file is None):
        given, missing = (("tls.cert_file", "tls.key_file") if tls.cert_file
                          else ("tls.key_file", "tls.cert_file"))
        raise ConfigError(f"{name(given)} is set but {name(missing)} is not: TLS needs both "
                          "a certificate and its key")
    if tls.client_ca_file is not None and tls.cert_file is None:
        raise ConfigError(f"{name('tls.client_ca_file')} needs TLS: set --tls-cert and "
                          "--tls-key too")
    if config.upstream.impersonate and config.upstream.kind != "kube":
        # Asked for, it must happen: the apiserver's audit would not show the users.
        raise ConfigError(f"{name('upstream.impersonate')} applies to the kube upstream, but "
                          f"{name('upstream.kind')} is {config.upstream.kind}: use --upstream "
                          "kube, or leave impersonation off")
    auth = config.auth
    if auth.oidc_issuer is None:
        for target in ("auth.oidc_audiences", "auth.oidc_jwks_file", "auth.oidc_username_claim",
                       "auth.oidc_username_prefix", "auth.oidc_groups_claim",
                       "auth.oidc_groups_prefix"):
            if target in merged:
                raise ConfigError(f"{name(target)} is set but {name('auth.oidc_issuer')} is "
                                  "not: OIDC needs its issuer")
    elif not auth.oidc_audiences or auth.oidc_jwks_file is None:
        missing = "auth.oidc_audiences" if not auth.oidc_audiences else "auth.oidc_jwks_file"
        raise ConfigError(f"{name('auth.oidc_issuer')} is set but {name(missing)} is not: "
                          "OIDC needs the issuer, its audiences (client ids) and its JWKS file")
    if not auth.tokenreview:
        for target in ("auth.tokenreview_audiences", "auth.tokenreview_cache_ttl_s"):
            if target in merged:
                raise ConfigError(f"{name(target)} is set but {name('auth.tokenreview')} is "
                                  "off: turn TokenReview on, or drop the setting")
    limits = config.limits
    if limits.max_message_bytes < limits.max_frame_bytes:
        raise ConfigError(
            f"{name('limits.max_message_bytes')} ({limits.max_message_bytes}) is smaller than "
            f"{name('limits.max_frame_bytes')} ({limits.max_frame_bytes}): a message is at "
            "least one frame")
    sessions = config.sessions
    if sessions.window_bytes > sessions.ring_bytes:
        # The ring must hold every unacknowledged byte, or a resume could ask for
        # output the ring already dropped while it was still in flight.
        raise ConfigError(
            f"{name('sessions.window_bytes')} ({sessions.window_bytes}) exceeds "
            f"{name('sessions.ring_bytes')} ({sessions.ring_bytes}): the ring must hold a "
            "whole window of unacknowledged output")


def load_agent_config(flags: _Flags | None, env: Mapping[str, str],
                      file_path: str | os.PathLike[str] | None = None) -> AgentConfig:
    """Build the :class:`AgentConfig` from flags > env > file > defaults.

    The pod identity defaults to the Downward API variables ``POD_NAMESPACE``
    and ``POD_NAME``; the shell to ``$SHELL``, then ``/bin/sh``.

    Raises:
        ConfigError: as :func:`load_serve_config`; also when the gateway URL or
            the pod identity is missing, or the credentials are not exactly one
            of (``--cert`` and ``--key``) or ``--token-file``.
    """
    settings = AGENT_SETTINGS
    defaults: _Layer = {}
    for target, var in (("namespace", "POD_NAMESPACE"), ("pod", "POD_NAME"), ("shell", "SHELL")):
        if env.get(var):
            defaults[target] = (env[var], _Source("default"))
    merged = _resolve(settings, flags, env, _config_path(flags, env, file_path), defaults)
    for target, flag, var in (("gateway", "--gateway", "PODTERM_GATEWAY"),
                              ("namespace", "--namespace", "POD_NAMESPACE"),
                              ("pod", "--pod", "POD_NAME")):
        if target not in merged:
            raise ConfigError(f"{flag} is required (or set {var})")
    groups = _group(merged)
    logging_cfg = LoggingConfig(**groups.pop("logging", {}))  # type: ignore[arg-type]
    config = AgentConfig(logging=logging_cfg, **groups.get("", {}))  # type: ignore[arg-type]
    has_cert = config.cert_file is not None or config.key_file is not None
    if (config.cert_file is None) != (config.key_file is None):
        raise ConfigError("--cert and --key go together: mutual TLS needs both")
    if has_cert == (config.token_file is not None):
        raise ConfigError("give the agent exactly one identity: --cert and --key, "
                          "or --token-file")
    return config


def client_config_path(env: Mapping[str, str]) -> tuple[Path | None, bool]:
    """Where the client config file is, and whether it must exist.

    ``PODTERM_CONFIG`` names a file that must exist; otherwise
    ``$XDG_CONFIG_HOME/podterm/config.toml`` (``~/.config/podterm/config.toml``)
    is read when present.
    """
    if env.get("PODTERM_CONFIG"):
        return Path(env["PODTERM_CONFIG"]), True
    if env.get("XDG_CONFIG_HOME"):
        return Path(env["XDG_CONFIG_HOME"]) / "podterm" / "config.toml", False
    if env.get("HOME"):
        return Path(env["HOME"]) / ".config" / "podterm" / "config.toml", False
    return None, False


def load_client_options(flags: _Flags | None, env: Mapping[str, str],
                        file_path: str | os.PathLike[str] | None = None) -> ClientOptions:
    """Build the connection part of :class:`ClientOptions` (flag > env > file > default).

    Args:
        flags: argparse Namespace or mapping with ``server``, ``token``, ``ca``,
            ``insecure_skip_tls_verify`` (and ``config``).
        env: the process environment; ``PODTERM_SERVER``, ``PODTERM_TOKEN``,
            ``PODTERM_CA``, ``PODTERM_INSECURE_SKIP_TLS_VERIFY``, ``PODTERM_CONFIG``,
            ``TERM``.
        file_path: the client config file; when None, ``--config``, then
            :func:`client_config_path` (a missing default file is fine).

    Returns:
        ClientOptions with the connection fields and ``term`` set; the command
        fields are left at their defaults for the caller to ``replace``.

    Raises:
        ConfigError: as :func:`load_serve_config`; also ``--ca`` together with
            ``--insecure-skip-tls-verify`` (kubectl refuses the same).
    """
    settings = CLIENT_SETTINGS
    path = _config_path(flags, {}, file_path)
    if path is None:
        path, required = client_config_path(env)
        if path is not None and not required and not path.is_file():
            path = None
    merged = _resolve(settings, flags, env, path)
    values = _group(merged).get("", {})
    options = ClientOptions(term=env.get("TERM") or None, **values)  # type: ignore[arg-type]
    if options.insecure and options.ca_file is not None:
        raise ConfigError(f"{_origin(merged, 'ca_file', settings)} and "
                          f"{_origin(merged, 'insecure', settings)} contradict each other: "
                          "verify with the CA, or skip verification, not both")
    return options


# ---------------------------------------------------------------------------
# Command-line values that are not settings
# ---------------------------------------------------------------------------

# RFC 1123 label (namespaces) and DNS subdomain (pod names), as Kubernetes validates them.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_POD = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def parse_target(text: str) -> tuple[str | None, str]:
    """Parse ``[NS/]POD`` into ``(namespace or None, pod)``.

    Raises:
        ConfigError: not ``NS/POD`` or ``POD`` with Kubernetes-valid names.
    """
    allowed = ("[NAMESPACE/]POD with Kubernetes names (lower-case letters, digits, '-', "
               "and '.' in pod names), e.g. default/web-0")
    namespace, sep, pod = text.rpartition("/")
    if sep and not _NAMESPACE.fullmatch(namespace):
        raise ConfigError(f"target: invalid value {text!r}: expected {allowed}")
    if not _POD.fullmatch(pod):
        raise ConfigError(f"target: invalid value {text!r}: expected {allowed}")
    return (namespace if sep else None), pod

