"""SubjectAccessReview delegation: existing cluster RBAC decides.

With ``delegate: subjectaccessreview`` in the policy, a request no policy
rule decides is put to the Kubernetes API, as the same question kubectl's
own request would raise there::

    POST /apis/authorization.k8s.io/v1/subjectaccessreviews
    {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
     "spec": {"user": "alice", "uid": "...", "groups": [...],
              "resourceAttributes": {"namespace": "dev", "verb": "create",
                                     "group": "", "resource": "pods",
                                     "subresource": "exec", "name": "web-0"}}}

Verb mapping (Kubernetes authorizes the exec/attach upgrade as ``create`` on
the subresource, also for the WebSocket GET since 1.30's
``AuthorizePodWebsocketUpgradeCreatePermission``):

=============  =============================
podterm verb   Kubernetes
=============  =============================
exec           create pods/exec
attach, join   create pods/attach (the API has no read-only attach)
others         no opinion (not asked): the policy's default denial applies
=============  =============================

A target without a namespace or pod is not asked either.  Answers are cached
per (user, uid, groups, subresource, namespace, pod): allowed for
``allow_ttl_s`` (60 s, so a revoked RoleBinding takes effect within a
minute), not allowed for ``deny_ttl_s`` (10 s).  When the API does not
answer, the request is denied (fail closed) with that reason, and nothing is
cached.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from podterm.auth.identity import Identity
from podterm.auth.rbac import Decision, Target, Verb
from podterm.auth.tokenreview import ApiServerClient, ApiServerUnavailable, TtlCache

__all__ = ["SAR_PATH", "SarStatistics", "SubjectAccessReviewer", "resource_attributes"]

log = logging.getLogger(__name__)

SAR_PATH = "/apis/authorization.k8s.io/v1/subjectaccessreviews"

#: podterm verb -> pods subresource asked about with verb "create".
_SUBRESOURCE = {Verb.EXEC.value: "exec", Verb.ATTACH.value: "attach",
                Verb.JOIN.value: "attach"}

#: See the module docstring for both lifetimes.
DEFAULT_ALLOW_TTL_S = 60.0
DEFAULT_DENY_TTL_S = 10.0
DEFAULT_TIMEOUT_S = 5.0


def resource_attributes(verb: str, target: Target) -> dict[str, str] | None:
    """The SAR ``resourceAttributes`` for ``verb`` on ``target``, or ``None`` (not askable)."""
    sub = _SUBRESOURCE.get(str(verb))
    if sub is None or not target.namespace or not target.pod:
        return None
    return {"namespace": target.namespace, "verb": "create", "group": "",
            "resource": "pods", "subresource": sub, "name": target.pod}


@dataclass(frozen=True, slots=True)
class SarStatistics:
    """Counters of one :class:`SubjectAccessReviewer`."""

    reviews: int
    cache_hits: int
    allowed: int
    denied: int
    errors: int
    not_asked: int
    cached: int


class SubjectAccessReviewer:
    """The :class:`podterm.auth.rbac.ExternalAuthorizer` that asks Kubernetes.

    Args:
        client: the apiserver client (shared with TokenReview if both are on).
        allow_ttl_s, deny_ttl_s: cache lifetimes.
        timeout_s: bound on one review.
        max_entries: cache size (LRU).
        clock: seconds (tests inject one).
    """

    __slots__ = ("client", "allow_ttl_s", "deny_ttl_s", "timeout_s", "clock", "_cache",
                 "_counts")

    def __init__(self, client: ApiServerClient, *, allow_ttl_s: float = DEFAULT_ALLOW_TTL_S,
                 deny_ttl_s: float = DEFAULT_DENY_TTL_S, timeout_s: float = DEFAULT_TIMEOUT_S,
                 max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.allow_ttl_s = allow_ttl_s
        self.deny_ttl_s = deny_ttl_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._cache = TtlCache(max_entries)
        self._counts: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"<SubjectAccessReviewer {self.client.url} cached={len(self._cache)}>"

    async def review(self, identity: Identity, verb: str, target: Target) -> Decision | None:
        """Kubernetes' decision, or ``None`` when the verb/target cannot be asked."""
        attrs = resource_attributes(verb, target)
        if attrs is None:
            self._counts["not_asked"] += 1
            return None
        key = (identity.user, identity.uid, identity.groups, attrs["subresource"],
               attrs["namespace"], attrs["name"])
        cached = self._cache.get(key, self.clock())
        if cached is not None:
            self._counts["cache_hits"] += 1
            assert isinstance(cached, Decision)
            return cached
        decision, ttl = await self._ask(identity, attrs)
        if ttl > 0:
            self._cache.put(key, decision, self.clock() + ttl)
        return decision

    async def _ask(self, identity: Identity, attrs: dict[str, str]) -> tuple[Decision, float]:
        self._counts["reviews"] += 1
        what = f"create pods/{attrs['subresource']} in namespace {attrs['namespace']}"
        rule = f"subjectaccessreview: {what}"
        spec: dict[str, Any] = {"resourceAttributes": attrs, "user": identity.user,
                                "groups": list(identity.groups)}
        if identity.uid:
            spec["uid"] = identity.uid
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "spec": spec}
        try:
            with trio.fail_after(self.timeout_s):
                status, answer = await self.client.post_json(SAR_PATH, body)
        except (ApiServerUnavailable, trio.TooSlowError) as exc:
            self._counts["errors"] += 1
            why = exc.message if isinstance(exc, ApiServerUnavailable) else \
                f"no answer within {self.timeout_s:g}s"
            log.warning("authz.sar.failed: %s", why)
            return Decision(False, f"the Kubernetes API did not answer the SubjectAccessReview "
                                   f"({why}); denied (fail closed)", default=True,
                            via="subjectaccessreview"), 0.0
        st = answer.get("status") if isinstance(answer, dict) else None
        if status not in (200, 201) or not isinstance(st, dict):
            self._counts["errors"] += 1
            log.warning("authz.sar.failed: HTTP %d from %s", status, self.client.url)
            return Decision(False, f"the Kubernetes API answered the SubjectAccessReview with "
                                   f"HTTP {status}; denied (fail closed)", default=True,
                            via="subjectaccessreview"), 0.0
        reason = st.get("reason") if isinstance(st.get("reason"), str) else ""
        error = st.get("evaluationError") if isinstance(st.get("evaluationError"), str) else ""
        if st.get("allowed") is True:
            self._counts["allowed"] += 1
            text = f"allowed by Kubernetes RBAC ({what})"
            return Decision(True, f"{text}: {reason}" if reason else text, rule=rule,
                            via="subjectaccessreview"), self.allow_ttl_s
        self._counts["denied"] += 1
        explicit = st.get("denied") is True
        text = f"Kubernetes RBAC does not allow {what}"
        detail = "; ".join(x for x in (reason, error) if x)
        return Decision(False, f"{text}: {detail}" if detail else text,
                        rule=rule if explicit else None, default=not explicit,
                        via="subjectaccessreview"), self.deny_ttl_s

    def statistics(self) -> SarStatistics:
        """A frozen snapshot."""
        c = self._counts
        return SarStatistics(reviews=c["reviews"], cache_hits=c["cache_hits"],
                             allowed=c["allowed"], denied=c["denied"], errors=c["errors"],
                             not_asked=c["not_asked"], cached=len(self._cache))
