"""TokenReview and SubjectAccessReview against a small HTTPS fake apiserver.

The fake (``tests/helpers/fake_kubeauth.py``) is the standard library's
HTTP/1.1 server (keep-alive) in a thread on 127.0.0.1, with a ``trustme``
certificate; it records every request (path, headers, JSON body) and answers
from a per-test function.  The code
under test speaks to it with h11 over trio, as it would to a kube-apiserver.
Caches are driven by an injected clock; no test sleeps.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from tests.helpers.fake_kubeauth import Answer, FakeApi, running_fake_api

from podterm.auth.authn import TokenAuthenticator
from podterm.auth.chain import (
    AuthenticatorChain,
    AuthFailure,
    Credentials,
    FailureReason,
    StaticTokenAuthenticator,
)
from podterm.auth.identity import Identity
from podterm.auth.rbac import Authorizer, Policy, Target
from podterm.auth.sar import SAR_PATH, SubjectAccessReviewer
from podterm.auth.tokenreview import (
    TOKENREVIEW_PATH,
    ApiServerClient,
    TokenReviewAuthenticator,
)
from podterm.errors import CloseCode, ConfigError, ForbiddenError

WAIT_S = 10.0
GATEWAY_TOKEN = "gateway-sa-token"  # the gateway's own credential towards the apiserver

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def fake_api(ca: trustme.CA, tmp_path: Path) -> Iterator[FakeApi]:
    with running_fake_api(ca, tmp_path) as api:
        yield api


def client_for(api: FakeApi) -> ApiServerClient:
    return ApiServerClient(api.url, ssl_context=ssl.create_default_context(
        cafile=str(api.ca_path)), authorization=f"Bearer {GATEWAY_TOKEN}")


class Clock:
    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def review_answer(users: dict[str, dict[str, Any]], audiences: list[str] | None = None
                  ) -> Callable[[str, Any], Answer]:
    """TokenReviews: tokens in ``users`` authenticate as that user; others do not."""
    def respond(path: str, body: Any) -> Answer:
        assert path == TOKENREVIEW_PATH
        user = users.get(body["spec"]["token"])
        status: dict[str, Any] = {"authenticated": user is not None}
        if user is not None:
            status["user"] = user
            status["audiences"] = audiences or body["spec"].get("audiences") or \
                ["https://kubernetes.default.svc"]
        else:
            status["error"] = "invalid bearer token, token lookup failed"
        return 201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                     "status": status}
    return respond


SA_USER = {"username": "system:serviceaccount:ci:deployer", "uid": "9f3c",
           "groups": ["system:serviceaccounts", "system:serviceaccounts:ci",
                      "system:authenticated"],
           "extra": {"authentication.kubernetes.io/pod-name": ["runner-0"]}}


# ---------------------------------------------------------------------------
# TokenReview
# ---------------------------------------------------------------------------


@pytest.mark.trio
async def test_tokenreview_valid_token_request_body_and_identity(fake_api: FakeApi) -> None:
    fake_api.respond = review_answer({"sa-token": SA_USER})
    client = client_for(fake_api)
    auth = TokenReviewAuthenticator(client, audiences=("podterm",), clock=Clock())
    try:
        result = await auth.review("sa-token")
    finally:
        await client.aclose()
    assert result.identity == Identity(user="system:serviceaccount:ci:deployer", uid="9f3c",
                                       groups=tuple(SA_USER["groups"]), method="tokenreview")
    assert result.extra == {"authentication.kubernetes.io/pod-name": ("runner-0",)}
    (req,) = fake_api.requests
    assert req.path == "/apis/authentication.k8s.io/v1/tokenreviews"
    assert req.body == {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                        "spec": {"token": "sa-token", "audiences": ["podterm"]}}
    assert req.headers["authorization"] == f"Bearer {GATEWAY_TOKEN}"
    assert req.headers["content-type"] == "application/json"


@pytest.mark.trio
async def test_tokenreview_wrong_token_is_rejected_401(fake_api: FakeApi) -> None:
    fake_api.respond = review_answer({})
    client = client_for(fake_api)
    auth = TokenReviewAuthenticator(client, clock=Clock())
    with pytest.raises(AuthFailure) as info:
        await auth.authenticate(Credentials(token="nope"))
    await client.aclose()
    exc = info.value
    assert (exc.reason, exc.method, exc.http_status, exc.close_code) == \
        (FailureReason.REJECTED, "tokenreview", 401, CloseCode.UNAUTHENTICATED)
    assert exc.message == ("the Kubernetes API did not authenticate the token: invalid bearer "
                           "token, token lookup failed")
    assert "audiences" not in fake_api.requests[0].body["spec"]


@pytest.mark.trio
async def test_tokenreview_audience_mismatch(fake_api: FakeApi) -> None:
    fake_api.respond = review_answer({"t": SA_USER}, audiences=["vault"])
    client = client_for(fake_api)
    auth = TokenReviewAuthenticator(client, audiences=("podterm",), clock=Clock())
    with pytest.raises(AuthFailure) as info:
        await auth.review("t")
    await client.aclose()
    assert info.value.reason is FailureReason.WRONG_AUDIENCE


@pytest.mark.trio
async def test_tokenreview_cache_ttl_positive_and_negative(fake_api: FakeApi) -> None:
    fake_api.respond = review_answer({"good": SA_USER})
    clock = Clock()
    client = client_for(fake_api)
    auth = TokenReviewAuthenticator(client, ttl_s=120, negative_ttl_s=10, clock=clock)
    for _ in range(5):
        await auth.review("good")
    assert len(fake_api.requests) == 1
    clock.now += 119.9
    await auth.review("good")
    assert len(fake_api.requests) == 1
    clock.now += 0.1  # TTL over: asked again
    await auth.review("good")
    assert len(fake_api.requests) == 2

    for _ in range(3):
        with pytest.raises(AuthFailure):
            await auth.review("bad")
    assert len(fake_api.requests) == 3  # negative answers cached too...
    clock.now += 10  # ...for negative_ttl_s
    with pytest.raises(AuthFailure):
        await auth.review("bad")
    assert len(fake_api.requests) == 4
    stats = auth.statistics()
    assert (stats.reviews, stats.cache_hits, stats.authenticated, stats.rejected) == \
        (4, 7, 2, 2)
    # one keep-alive connection served every review
    assert fake_api.connections == 1
    await client.aclose()


@pytest.mark.trio
async def test_tokenreview_cache_never_outlives_the_jwt_exp(fake_api: FakeApi) -> None:
    clock = Clock()
    payload = base64.urlsafe_b64encode(json.dumps({"exp": clock.now + 30}).encode())
    jwt = f"eyJhbGciOiJSUzI1NiJ9.{payload.rstrip(b'=').decode()}.c2ln"
    fake_api.respond = review_answer({jwt: SA_USER})
    client = client_for(fake_api)
    auth = TokenReviewAuthenticator(client, ttl_s=120, clock=clock)
    await auth.review(jwt)
    clock.now += 29
    await auth.review(jwt)
    assert len(fake_api.requests) == 1
    clock.now += 1  # the token's exp, long before the 120 s TTL: asked again
    await auth.review(jwt)
    assert len(fake_api.requests) == 2
    await client.aclose()


@pytest.mark.trio
async def test_concurrent_reviews_of_one_token_share_one_request(fake_api: FakeApi) -> None:
    fake_api.respond = review_answer({"good": SA_USER})
    fake_api.gate = threading.Event()
    client = client_for(fake_api)
    auth = TokenReviewAuthenticator(client, clock=Clock())
    results: list[Identity] = []

    async def one() -> None:
        results.append((await auth.review("good")).identity)

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
            await trio.to_thread.run_sync(fake_api.arrived.wait, WAIT_S)
            await trio.testing.wait_all_tasks_blocked()
            fake_api.gate.set()
    await client.aclose()
    assert len(results) == 20 and len(set(results)) == 1
    assert len(fake_api.requests) == 1
    assert auth.statistics().shared == 19


@pytest.mark.trio
async def test_tokenreview_unavailable_is_503_and_not_cached(fake_api: FakeApi) -> None:
    calls = {"n": 0}

    def flaky(path: str, body: Any) -> Answer:
        calls["n"] += 1
        if calls["n"] == 1:
            return 500, {"kind": "Status", "message": "etcdserver: request timed out"}
        return review_answer({"good": SA_USER})(path, body)

    fake_api.respond = flaky
    client = client_for(fake_api)
    auth = TokenReviewAuthenticator(client, clock=Clock())
    with pytest.raises(AuthFailure) as info:
        await auth.review("good")
    exc = info.value
    assert exc.reason is FailureReason.UNAVAILABLE
    assert (exc.http_status, exc.close_code) == (503, CloseCode.TRY_AGAIN_LATER)
    assert exc.to_event(at=0.0).outcome == "rejected"
    assert (await auth.review("good")).identity.user == SA_USER["username"]  # not cached
    await client.aclose()


@pytest.mark.trio
async def test_tokenreview_apiserver_down_is_unavailable() -> None:
    # A port nobody listens on (bound, then closed).
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    client = ApiServerClient(f"https://127.0.0.1:{port}", ssl_context=ssl.create_default_context())
    auth = TokenReviewAuthenticator(client, clock=Clock())
    with pytest.raises(AuthFailure) as info:
        await auth.review("t")
    assert info.value.reason is FailureReason.UNAVAILABLE
    assert auth.statistics().unavailable == 1


@pytest.mark.trio
async def test_tokenreview_timeout_is_unavailable(fake_api: FakeApi,
                                                  autojump_clock: trio.testing.MockClock
                                                  ) -> None:
    # The answer is held; MockClock jumps to the 5 s deadline as soon as all
    # tasks block, so the timeout fires without waiting in real time.
    fake_api.respond = review_answer({"good": SA_USER})
    fake_api.gate = threading.Event()
    client = client_for(fake_api)
    auth = TokenReviewAuthenticator(client, timeout_s=5.0, clock=Clock())
    with pytest.raises(AuthFailure) as info:
        await auth.review("good")
    assert info.value.reason is FailureReason.UNAVAILABLE
    fake_api.gate.set()
    await client.aclose()


@pytest.mark.trio
async def test_chain_static_first_then_tokenreview(fake_api: FakeApi) -> None:
    fake_api.respond = review_answer({"sa-token": SA_USER})
    tokens = TokenAuthenticator()
    tokens.add_admin_token("admin-token")
    client = client_for(fake_api)
    chain = AuthenticatorChain([StaticTokenAuthenticator(tokens),
                                TokenReviewAuthenticator(client, clock=Clock())])
    assert (await chain.authenticate(Credentials(token="admin-token"))).method == \
        "generated-admin"
    assert fake_api.requests == []  # the static table answered: the apiserver was not asked
    assert (await chain.authenticate(Credentials(token="sa-token"))).user == \
        SA_USER["username"]
    with pytest.raises(AuthFailure) as info:
        await chain.authenticate(Credentials(token="stolen"))
    await client.aclose()
    event = info.value.to_event(source_addr="192.0.2.1", at=0.0)
    assert event.details == {"method": "tokenreview", "reason": "rejected",
                             "http_status": 401, "close_code": 4401}
    assert "stolen" not in event.to_json_line().decode()


@pytest.mark.trio
async def test_client_from_kubeconfig(fake_api: FakeApi, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {
            "server": fake_api.url, "certificate-authority": str(fake_api.ca_path)}}],
        "users": [{"name": "gw", "user": {"token": GATEWAY_TOKEN}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "gw"}}],
    }))
    fake_api.respond = review_answer({"sa-token": SA_USER})
    client = ApiServerClient.from_kubeconfig(str(kubeconfig))
    auth = TokenReviewAuthenticator(client, clock=Clock())
    assert (await auth.review("sa-token")).identity.user == SA_USER["username"]
    await client.aclose()
    assert fake_api.requests[0].headers["authorization"] == f"Bearer {GATEWAY_TOKEN}"


def test_from_kubeconfig_errors_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    with pytest.raises(ConfigError, match="kubeconfig"):
        ApiServerClient.from_kubeconfig(str(bad))
    with pytest.raises(ConfigError, match="invalid value 'ftp://x'"):
        ApiServerClient("ftp://x", ssl_context=None)


# ---------------------------------------------------------------------------
# SubjectAccessReview
# ---------------------------------------------------------------------------

ALICE = Identity(user="alice", uid="a-1", groups=("dev", "system:authenticated"),
                 method="oidc")


def sar_answer(allowed: set[tuple[str, str, str]], denied: AbstractSet[tuple[str, str, str]] = frozenset()
               ) -> Callable[[str, Any], Answer]:
    """SARs: (user, subresource, namespace) in ``allowed`` are allowed, in ``denied`` denied."""
    def respond(path: str, body: Any) -> Answer:
        assert path == SAR_PATH
        spec = body["spec"]
        ra = spec["resourceAttributes"]
        key = (spec["user"], ra["subresource"], ra["namespace"])
        status: dict[str, Any] = {"allowed": key in allowed}
        if key in allowed:
            status["reason"] = 'RBAC: allowed by RoleBinding "devs/dev" of Role "exec"'
        elif key in denied:
            status["denied"] = True
            status["reason"] = "denied by webhook policy"
        return 201, {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                     "status": status}
    return respond


@pytest.mark.trio
async def test_sar_allowed_request_body_and_decision(fake_api: FakeApi) -> None:
    fake_api.respond = sar_answer({("alice", "exec", "dev")})
    client = client_for(fake_api)
    sar = SubjectAccessReviewer(client, clock=Clock())
    decision = await sar.review(ALICE, "exec", Target("dev", "web-0", "app"))
    await client.aclose()
    assert decision is not None and decision.allowed
    assert decision.via == "subjectaccessreview"
    assert decision.rule == "subjectaccessreview: create pods/exec in namespace dev"
    assert decision.reason == ('allowed by Kubernetes RBAC (create pods/exec in namespace '
                               'dev): RBAC: allowed by RoleBinding "devs/dev" of Role "exec"')
    (req,) = fake_api.requests
    assert req.path == "/apis/authorization.k8s.io/v1/subjectaccessreviews"
    assert req.body == {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"resourceAttributes": {"namespace": "dev", "verb": "create", "group": "",
                                        "resource": "pods", "subresource": "exec",
                                        "name": "web-0"},
                 "user": "alice", "groups": ["dev", "system:authenticated"], "uid": "a-1"}}
    assert req.headers["authorization"] == f"Bearer {GATEWAY_TOKEN}"


@pytest.mark.trio
async def test_sar_verb_mapping_and_unaskable_targets(fake_api: FakeApi) -> None:
    fake_api.respond = sar_answer({("alice", "attach", "dev")})
    client = client_for(fake_api)
    sar = SubjectAccessReviewer(client, clock=Clock())
    assert (await sar.review(ALICE, "join", Target("dev", "web-0"))).allowed  # type: ignore[union-attr]
    assert fake_api.requests[-1].body["spec"]["resourceAttributes"]["subresource"] == "attach"
    # verbs Kubernetes has no question for, and targets without a pod: no opinion, not asked
    assert await sar.review(ALICE, "view-recording", Target("dev", "web-0")) is None
    assert await sar.review(ALICE, "exec", Target("dev")) is None
    await client.aclose()
    assert len(fake_api.requests) == 1
    assert sar.statistics().not_asked == 2


@pytest.mark.trio
async def test_sar_denied_default_and_explicit(fake_api: FakeApi) -> None:
    fake_api.respond = sar_answer(set(), denied={("alice", "exec", "kube-system")})
    client = client_for(fake_api)
    sar = SubjectAccessReviewer(client, clock=Clock())
    plain = await sar.review(ALICE, "exec", Target("prod", "db-0"))
    explicit = await sar.review(ALICE, "exec", Target("kube-system", "etcd-0"))
    await client.aclose()
    assert plain is not None and not plain.allowed and plain.default and plain.rule is None
    assert plain.reason == "Kubernetes RBAC does not allow create pods/exec in namespace prod"
    assert explicit is not None and not explicit.allowed and not explicit.default
    assert explicit.reason.endswith(": denied by webhook policy")


@pytest.mark.trio
async def test_sar_cache_ttl(fake_api: FakeApi) -> None:
    fake_api.respond = sar_answer({("alice", "exec", "dev")})
    clock = Clock(0.0)
    client = client_for(fake_api)
    sar = SubjectAccessReviewer(client, allow_ttl_s=60, deny_ttl_s=10, clock=clock)
    allowed, denied = Target("dev", "web-0"), Target("prod", "web-0")
    for _ in range(3):
        await sar.review(ALICE, "exec", allowed)
        await sar.review(ALICE, "exec", denied)
    assert len(fake_api.requests) == 2
    clock.now = 10.0  # the denial expired, the grant did not
    await sar.review(ALICE, "exec", allowed)
    await sar.review(ALICE, "exec", denied)
    assert len(fake_api.requests) == 3
    # another pod, another group set: separate questions
    await sar.review(ALICE, "exec", Target("dev", "web-1"))
    await sar.review(Identity(user="alice", uid="a-1", groups=("dev",)), "exec", allowed)
    assert len(fake_api.requests) == 5
    clock.now = 60.0
    await sar.review(ALICE, "exec", allowed)
    assert len(fake_api.requests) == 6
    await client.aclose()
    assert sar.statistics().cache_hits == 5


@pytest.mark.trio
async def test_sar_api_error_fails_closed_and_is_not_cached(fake_api: FakeApi) -> None:
    fake_api.respond = lambda path, body: (403, {"kind": "Status", "message": "forbidden"})
    client = client_for(fake_api)
    sar = SubjectAccessReviewer(client, clock=Clock())
    first = await sar.review(ALICE, "exec", Target("dev", "web-0"))
    assert first is not None and not first.allowed
    assert first.reason == ("the Kubernetes API answered the SubjectAccessReview with HTTP "
                            "403; denied (fail closed)")
    fake_api.respond = sar_answer({("alice", "exec", "dev")})
    second = await sar.review(ALICE, "exec", Target("dev", "web-0"))
    await client.aclose()
    assert second is not None and second.allowed
    assert sar.statistics().errors == 1


POLICY = """\
delegate: subjectaccessreview
roles:
  - name: no-kube-system
    rules:
      - effect: deny
        verbs: ["*"]
        namespaces: [kube-system]
  - name: sre-prod
    rules:
      - verbs: [exec]
        namespaces: [prod]
bindings:
  - name: everyone
    role: no-kube-system
    groups: ["system:authenticated"]
  - name: sre
    role: sre-prod
    users: [alice]
"""


@pytest.mark.trio
async def test_authorizer_with_sar_outcomes_and_audit_events(fake_api: FakeApi) -> None:
    """The RBAC outcome matrix with delegation: allowed by rule, denied by a deny rule
    (Kubernetes never asked), allowed by Kubernetes, denied by default."""
    fake_api.respond = sar_answer({("alice", "exec", "dev"), ("alice", "exec", "kube-system")})
    client = client_for(fake_api)
    authz = Authorizer(Policy.from_text(POLICY, source="p.yaml"),
                       external=SubjectAccessReviewer(client, clock=Clock()))
    by_rule = await authz.decide(ALICE, "exec", Target("prod", "api-0"))
    by_deny = await authz.decide(ALICE, "exec", Target("kube-system", "etcd-0"))
    by_sar = await authz.decide(ALICE, "exec", Target("dev", "web-0"))
    by_default = await authz.decide(ALICE, "exec", Target("staging", "web-0"))
    await client.aclose()

    assert (by_rule.allowed, by_rule.rule) == (True, "role sre-prod rule 1 (binding sre)")
    assert (by_deny.allowed, by_deny.rule) == (False,
                                               "role no-kube-system rule 1 (binding everyone)")
    assert (by_sar.allowed, by_sar.via) == (True, "subjectaccessreview")
    assert (by_default.allowed, by_default.default, by_default.via) == \
        (False, True, "subjectaccessreview")
    # only the two undecided requests reached Kubernetes
    asked = [b["spec"]["resourceAttributes"]["namespace"] for b in fake_api.bodies(SAR_PATH)]
    assert asked == ["dev", "staging"]

    events = [d.to_event(ALICE, "exec", t, at=0.0) for d, t in (
        (by_sar, Target("dev", "web-0")), (by_default, Target("staging", "web-0")))]
    assert [(e.type, e.outcome, e.details["via"]) for e in events] == [
        ("authz.allow", "success", "subjectaccessreview"),
        ("authz.deny", "denied", "subjectaccessreview")]
    with pytest.raises(ForbiddenError) as info:
        by_default.check(ALICE, "exec", Target("staging", "web-0"))
    assert (info.value.http_status, info.value.close_code) == (403, CloseCode.FORBIDDEN)
