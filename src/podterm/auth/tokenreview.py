"""Kubernetes TokenReview: let the apiserver vouch for a bearer token.

Users' existing service-account tokens (and whatever OIDC or webhook tokens
their cluster accepts) work at the gateway by asking the cluster::

    POST /apis/authentication.k8s.io/v1/tokenreviews
    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
     "spec": {"token": "...", "audiences": [...]}}

and taking ``status.user`` (username, uid, groups, extra) when
``status.authenticated`` is true.

Results are cached by the token's SHA-256 digest (never the token): positive
ones for ``ttl_s`` (120 s, kube-apiserver's webhook token cache default) but
never past the token's own ``exp`` when it is a JWT; negative ones for
``negative_ttl_s`` (10 s), so a flood of one bad token costs the apiserver one
review per 10 s.  Concurrent reviews of the same token share one request
(a reconnect storm of 1,000 sessions with one token is one POST).  An
apiserver that does not answer is ``authenticator_unavailable`` (503), never
cached.

HTTP: :class:`ApiServerClient` speaks HTTP/1.1 itself, with h11 over trio,
keeping a few keep-alive connections.  We chose that over the official
client's synchronous API in ``trio.to_thread``: a review must be cancellable
(a client that gives up, a handshake deadline), and a cancelled thread keeps
running and holding its ``CapacityLimiter`` slot, so a login flood against a
slow apiserver would pin every slot; in trio the cancel scope closes the
socket.  Only the *credentials* come from the official client:
:meth:`ApiServerClient.from_kubeconfig` runs ``kubernetes.config``'s loaders
(kubeconfig contexts, client certificates, bearer tokens, exec plugins,
in-cluster service-account files) into a ``Configuration`` and reads the URL,
CA, client certificate and ``Authorization`` value from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from podterm.auth.chain import AuthFailure, Credentials, FailureReason
from podterm.auth.identity import Identity
from podterm.auth.oidc import peek_claims
from podterm.errors import ConfigError, PodtermError
from podterm.net.h11client import AnswerClosed, AnswerTooLarge, read_body, read_head

__all__ = [
    "ApiServerClient",
    "ApiServerUnavailable",
    "DEFAULT_NEGATIVE_TTL_S",
    "DEFAULT_TTL_S",
    "TokenReviewAuthenticator",
    "TokenReviewResult",
    "TokenReviewStatistics",
    "TtlCache",
]

log = logging.getLogger(__name__)

TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

#: kube-apiserver's --authentication-token-webhook-cache-ttl default (2m).
DEFAULT_TTL_S = 120.0
#: Negative results: kube-apiserver's token cache keeps failures 10 s.
DEFAULT_NEGATIVE_TTL_S = 10.0
#: Each review (connect, TLS, answer) must finish within this; the
#: apiserver answers a TokenReview in milliseconds when it is healthy.
DEFAULT_TIMEOUT_S = 5.0
#: Cached reviews (about 300 B each): 10,000 distinct tokens ~ 3 MB.
DEFAULT_MAX_ENTRIES = 10_000
#: Answers are small JSON objects; a 1 MiB cap bounds a broken server.
_MAX_BODY = 1024 * 1024
#: How often the credential refresh hook (exec plugins, rotated in-cluster
#: token files) runs; after a 401 from the apiserver it runs at once.
_REFRESH_INTERVAL_S = 60.0


class ApiServerUnavailable(PodtermError):
    """The apiserver could not be asked or gave an unusable answer (503)."""

    http_status = 503
    outcome = "error"
    reason_name = "ServiceUnavailable"


# ---------------------------------------------------------------------------
# A small apiserver client
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Conn:
    stream: trio.abc.Stream
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))


class ApiServerClient:
    """POSTs JSON to a kube-apiserver over HTTPS, keeping a few connections.

    Args:
        url: ``https://host:port`` of the apiserver.
        ssl_context: how to verify it (and our client certificate, if any);
            ``None`` for plain HTTP (tests only).
        authorization: the ``Authorization`` header value (``"Bearer ..."``),
            or ``None`` (client-certificate auth).
        server_hostname: the TLS name to expect, if not the URL's host.
        refresh: called (in a thread) to get a fresh ``Authorization`` value,
            every minute and after a 401; the kubeconfig loader's refresh hook.
        max_connections: concurrent requests (each on its own connection).
        max_idle: keep-alive connections kept between requests.

    Resource handling: call :meth:`aclose` to close idle connections.
    """

    __slots__ = ("url", "host", "port", "ssl_context", "server_hostname", "_authorization",
                 "_refresh", "_refreshed_at", "_limiter", "_idle", "max_idle", "_requests",
                 "_errors", "_host_header")

    def __init__(self, url: str, *, ssl_context: ssl.SSLContext | None,
                 authorization: str | None = None, server_hostname: str | None = None,
                 refresh: Callable[[], str | None] | None = None, max_connections: int = 16,
                 max_idle: int = 4) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError(f"apiserver URL: invalid value {url!r}: expected https://HOST[:PORT]")
        if parts.scheme == "https" and ssl_context is None:
            raise ConfigError(f"apiserver URL {url!r}: https needs an SSL context")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._host_header = parts.netloc
        self.ssl_context = ssl_context if parts.scheme == "https" else None
        self.server_hostname = server_hostname or self.host
        self._authorization = authorization
        self._refresh = refresh
        self._refreshed_at = -math.inf
        self._limiter = trio.CapacityLimiter(max_connections)
        self._idle: list[_Conn] = []
        self.max_idle = max_idle
        self._requests = 0
        self._errors = 0

    def __repr__(self) -> str:
        return (f"<ApiServerClient {self.url} idle={len(self._idle)} "
                f"requests={self._requests} errors={self._errors}>")

    @classmethod
    def from_configuration(cls, cfg: Any, **kwargs: Any) -> ApiServerClient:
        """Build from a ``kubernetes.client.Configuration`` (after a loader ran).

        Raises:
            ConfigError: a proxy is configured (not supported), or a CA,
                certificate or key file cannot be loaded.
        """
        if getattr(cfg, "proxy", None):
            raise ConfigError("apiserver: an HTTP proxy is configured in the kubeconfig; "
                              "podterm's TokenReview/SubjectAccessReview client does not "
                              "support proxies")
        ctx: ssl.SSLContext | None = None
        host: str = cfg.host
        if host.startswith("https://"):
            try:
                ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
                if not cfg.verify_ssl:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                if cfg.cert_file:
                    ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"apiserver TLS files: {exc}") from exc

        def authorization() -> str | None:
            value = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
            if value is None and cfg.username:
                value = cfg.get_basic_auth_token()
            return value if isinstance(value, str) else None

        hook = cfg.refresh_api_key_hook
        return cls(host, ssl_context=ctx,
                   authorization=authorization() if hook is None else None,
                   server_hostname=getattr(cfg, "tls_server_name", None) or None,
                   refresh=authorization if hook is not None else None, **kwargs)

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, *, context: str | None = None,
                        **kwargs: Any) -> ApiServerClient:
        """Credentials from a kubeconfig (or in-cluster when ``path`` is None and
        the process runs in a pod), via the official client's loaders.

        Raises:
            ConfigError: the kubeconfig cannot be loaded.
        """
        from kubernetes import client as kclient
        from kubernetes import config as kconfig

        cfg = kclient.Configuration()
        try:
            if path is None:
                try:
                    kconfig.load_incluster_config(  # type: ignore[no-untyped-call]
                        client_configuration=cfg)
                except kconfig.ConfigException:
                    kconfig.load_kube_config(  # type: ignore[no-untyped-call]
                        context=context, client_configuration=cfg, persist_config=False)
            else:
                kconfig.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=path, context=context, client_configuration=cfg,
                    persist_config=False)
        except (kconfig.ConfigException, OSError, ValueError) as exc:
            raise ConfigError(f"kubeconfig {path or '(default)'}: {exc}") from exc
        return cls.from_configuration(cfg, **kwargs)

    async def _authorization_value(self, *, force: bool = False) -> str | None:
        if self._refresh is None:
            return self._authorization
        now = trio.current_time()
        if force or self._authorization is None or \
                now - self._refreshed_at >= _REFRESH_INTERVAL_S:
            self._authorization = await trio.to_thread.run_sync(self._refresh)
            self._refreshed_at = now
        return self._authorization

    async def _open(self) -> _Conn:
        try:
            tcp = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise ApiServerUnavailable(f"cannot connect to {self.url}: "
                                       f"{exc.strerror or exc}") from exc
        if self.ssl_context is None:
            return _Conn(tcp)
        tls = trio.SSLStream(tcp, self.ssl_context, server_hostname=self.server_hostname)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(tcp)
            cause = exc.__cause__
            raise ApiServerUnavailable(f"TLS with {self.url} failed: {cause or exc}") from exc
        except BaseException:
            # Cancelled mid-handshake (a deadline, a client that left): the
            # socket is ours to close, or it lingers until garbage collection.
            await trio.aclose_forcefully(tcp)
            raise
        return _Conn(tls)

    async def post_json(self, path: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        """POST ``body`` as JSON; the status and the decoded JSON answer.

        Raises:
            ApiServerUnavailable: connect/TLS failure, a broken connection,
                or an answer that is not JSON.
        """
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        async with self._limiter:
            self._requests += 1
            try:
                status, raw = await self._post(path, data, await self._authorization_value())
                if status == 401 and self._refresh is not None:
                    # Our credential may have expired (exec plugin, rotated token file).
                    status, raw = await self._post(
                        path, data, await self._authorization_value(force=True))
            except ApiServerUnavailable:
                self._errors += 1
                raise
        try:
            return status, json.loads(raw) if raw else None
        except ValueError as exc:
            self._errors += 1
            raise ApiServerUnavailable(f"{self.url}{path}: HTTP {status} with a body that is "
                                       "not JSON") from exc

    async def _post(self, path: str, data: bytes, authorization: str | None
                    ) -> tuple[int, bytes]:
        headers = [("Host", self._host_header), ("User-Agent", "podterm"),
                   ("Content-Type", "application/json"), ("Accept", "application/json"),
                   ("Content-Length", str(len(data)))]
        if authorization:
            headers.append(("Authorization", authorization))
        request = h11.Request(method="POST", target=path, headers=headers)
        for attempt in (0, 1):
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._open()
            keep = False
            try:
                status, raw, keep = await self._exchange(conn, request, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError,
                    h11.ProtocolError) as exc:
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: retry fresh
                raise ApiServerUnavailable(f"{self.url}{path}: connection failed: "
                                           f"{exc}") from exc
            finally:
                # Cancelled or failed mid-exchange: the connection's state is unknown.
                if keep and len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                else:
                    await trio.aclose_forcefully(conn.stream)
            return status, raw
        raise AssertionError("unreachable")  # pragma: no cover

    async def _exchange(self, conn: _Conn, request: h11.Request, data: bytes
                        ) -> tuple[int, bytes, bool]:
        h = conn.h11
        await conn.stream.send_all(h.send(request) + h.send(h11.Data(data=data))
                                   + h.send(h11.EndOfMessage()))
        try:
            head = await read_head(conn.stream, h)
            body = await read_body(conn.stream, h, limit=_MAX_BODY)
        except AnswerClosed as exc:
            raise trio.BrokenResourceError(str(exc)) from None
        except AnswerTooLarge:
            raise h11.RemoteProtocolError(f"answer larger than {_MAX_BODY} bytes") from None
        keep = h.our_state is h11.DONE and h.their_state is h11.DONE
        if keep:
            h.start_next_cycle()
        return head.status_code, body, keep

    async def aclose(self) -> None:
        """Close the idle connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)


# ---------------------------------------------------------------------------
# Cache shared with sar.py
# ---------------------------------------------------------------------------


class TtlCache:
    """A bounded LRU of ``key -> (expires_at, value)``; time is passed in.

    Shared by TokenReview and SubjectAccessReview results.
    """

    __slots__ = ("max_entries", "_items", "evictions")

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._items: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self.evictions = 0

    def get(self, key: Any, now: float) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        if now >= item[0]:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: Any, value: Any, expires_at: float) -> None:
        self._items[key] = (expires_at, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._items)


class _InFlight:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Any = None


# ---------------------------------------------------------------------------
# TokenReview
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenReviewResult:
    """What the apiserver said about a token it authenticated.

    Attributes:
        identity: user, uid, groups; ``method="tokenreview"``.
        extra: ``status.user.extra``, e.g.
            ``authentication.kubernetes.io/pod-name`` for a pod-bound
            service-account token (agents register only that pod).
        audiences: ``status.audiences``.
    """

    identity: Identity
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    audiences: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenReviewStatistics:
    """Counters of one :class:`TokenReviewAuthenticator`."""

    reviews: int
    cache_hits: int
    shared: int
    authenticated: int
    rejected: int
    unavailable: int
    cached: int
    evictions: int


class TokenReviewAuthenticator:
    """Chain member that asks the apiserver about any bearer token (put it last).

    Args:
        client: the :class:`ApiServerClient`.
        audiences: ``spec.audiences`` to request (e.g. the gateway's own
            audience for projected tokens); ``()`` = the apiserver's default.
            When given, the answer's ``status.audiences`` must share one.
        ttl_s, negative_ttl_s: cache lifetimes (see the module docstring).
        timeout_s: bound on one review.
        max_entries: cache size (LRU).
        clock: wall-clock seconds (tests inject; JWT ``exp`` is wall time too).
    """

    __slots__ = ("client", "audiences", "ttl_s", "negative_ttl_s", "timeout_s", "clock",
                 "_cache", "_inflight", "_counts")

    def __init__(self, client: ApiServerClient, *, audiences: Sequence[str] = (),
                 ttl_s: float = DEFAULT_TTL_S, negative_ttl_s: float = DEFAULT_NEGATIVE_TTL_S,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.audiences = tuple(audiences)
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._cache = TtlCache(max_entries)
        self._inflight: dict[bytes, _InFlight] = {}
        self._counts: Counter[str] = Counter()

    @property
    def name(self) -> str:
        return "tokenreview"

    def __repr__(self) -> str:
        return f"<TokenReviewAuthenticator {self.client.url} cached={len(self._cache)}>"

    async def authenticate(self, credentials: Credentials) -> Identity | None:
        """Chain member: recognizes every bearer token."""
        if not credentials.token:
            return None
        return (await self.review(credentials.token)).identity

    async def review(self, token: str) -> TokenReviewResult:
        """The apiserver's verdict on ``token`` (cached).

        Raises:
            AuthFailure: ``rejected`` (not authenticated, or for other
                audiences) or ``authenticator_unavailable``.
        """
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        while True:
            cached = self._cache.get(digest, self.clock())
            if cached is not None:
                self._counts["cache_hits"] += 1
                return _unwrap(cached)
            flight = self._inflight.get(digest)
            if flight is None:
                break
            await flight.done.wait()
            if flight.result is not None:
                self._counts["shared"] += 1
                return _unwrap(flight.result)
            # The leader was cancelled: loop, and lead the next attempt ourselves.
        flight = self._inflight[digest] = _InFlight()
        try:
            result = await self._review(token)
            flight.result = result
        finally:
            del self._inflight[digest]
            flight.done.set()
        if not (isinstance(result, AuthFailure)
                and result.reason is FailureReason.UNAVAILABLE):
            now = self.clock()
            if isinstance(result, TokenReviewResult):
                expires = now + self.ttl_s
                exp = _jwt_exp(token)
                if exp is not None:
                    expires = min(expires, exp)
            else:
                expires = now + self.negative_ttl_s
            self._cache.put(digest, result, expires)
        return _unwrap(result)

    async def _review(self, token: str) -> TokenReviewResult | AuthFailure:
        self._counts["reviews"] += 1
        spec: dict[str, Any] = {"token": token}
        if self.audiences:
            spec["audiences"] = list(self.audiences)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        try:
            with trio.fail_after(self.timeout_s):
                status, answer = await self.client.post_json(TOKENREVIEW_PATH, body)
        except (ApiServerUnavailable, trio.TooSlowError) as exc:
            self._counts["unavailable"] += 1
            why = exc.message if isinstance(exc, PodtermError) else \
                f"no answer within {self.timeout_s:g}s"
            log.warning("auth.tokenreview.failed: %s", why)
            return AuthFailure(FailureReason.UNAVAILABLE, "cannot verify the token now: the "
                               "Kubernetes API did not answer the TokenReview; retry later",
                               method="tokenreview")
        if status not in (200, 201) or not isinstance(answer, dict):
            self._counts["unavailable"] += 1
            message = answer.get("message") if isinstance(answer, dict) else None
            log.warning("auth.tokenreview.failed: HTTP %d from %s: %s", status,
                        self.client.url, message)
            return AuthFailure(FailureReason.UNAVAILABLE, f"cannot verify the token now: the "
                               f"Kubernetes API answered the TokenReview with HTTP {status}",
                               method="tokenreview")
        st = answer.get("status") or {}
        if not isinstance(st, dict) or st.get("authenticated") is not True:
            self._counts["rejected"] += 1
            error = st.get("error") if isinstance(st, dict) else None
            # The apiserver's error text says why (expired, invalid signature, ...)
            # and never contains the token.
            detail = f": {error}" if isinstance(error, str) and error else ""
            return AuthFailure(FailureReason.REJECTED,
                               f"the Kubernetes API did not authenticate the token{detail}",
                               method="tokenreview")
        got_audiences = tuple(a for a in st.get("audiences") or () if isinstance(a, str))
        if self.audiences and not set(got_audiences) & set(self.audiences):
            self._counts["rejected"] += 1
            return AuthFailure(FailureReason.WRONG_AUDIENCE,
                               f"the token is not for audience {', '.join(self.audiences)}",
                               method="tokenreview")
        user = st.get("user") or {}
        name = user.get("username") if isinstance(user, dict) else None
        if not isinstance(name, str) or not name:
            self._counts["unavailable"] += 1
            return AuthFailure(FailureReason.UNAVAILABLE, "the TokenReview answer has no user "
                                                          "name", method="tokenreview")
        uid = user.get("uid")
        groups = tuple(g for g in user.get("groups") or () if isinstance(g, str) and g)
        raw_extra = user.get("extra") or {}
        extra = MappingProxyType({
            str(k): tuple(str(x) for x in v) for k, v in raw_extra.items()
            if isinstance(v, list)}) if isinstance(raw_extra, dict) else MappingProxyType({})
        self._counts["authenticated"] += 1
        identity = Identity(user=name, uid=uid if isinstance(uid, str) and uid else name,
                            groups=groups, method="tokenreview")
        return TokenReviewResult(identity=identity, extra=extra, audiences=got_audiences)

    def statistics(self) -> TokenReviewStatistics:
        """A frozen snapshot."""
        c = self._counts
        return TokenReviewStatistics(reviews=c["reviews"], cache_hits=c["cache_hits"],
                                     shared=c["shared"], authenticated=c["authenticated"],
                                     rejected=c["rejected"], unavailable=c["unavailable"],
                                     cached=len(self._cache), evictions=self._cache.evictions)


def _unwrap(result: TokenReviewResult | AuthFailure) -> TokenReviewResult:
    if isinstance(result, AuthFailure):
        # A fresh exception each time: one raised object must not collect
        # tracebacks from many tasks.
        raise AuthFailure(result.reason, result.message, method=result.method)
    return result


def _jwt_exp(token: str) -> float | None:
    """The unverified ``exp`` of a JWT-shaped token (service-account tokens are)."""
    claims = peek_claims(token)
    exp = claims.get("exp") if claims is not None else None
    if isinstance(exp, (int, float)) and not isinstance(exp, bool) and math.isfinite(exp):
        return float(exp)
    return None
