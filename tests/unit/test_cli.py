"""podterm.cli (plus podterm.logs and podterm.doctor): parsing, dispatch, exit status, output.

Entry points of other areas are replaced by stand-in modules placed in
``sys.modules``: the CLI's contract with them is "import this name, call it
with this options object, return its status", which is what these check.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from podterm import __version__, cli, logs
from podterm.config import (
    AGENT_SETTINGS,
    CLIENT_SETTINGS,
    SERVE_SETTINGS,
    AgentConfig,
    BenchOptions,
    CertsInitOptions,
    ClientOptions,
    KubeconfigOptions,
    PolicyCheckOptions,
    ReplayOptions,
    ServeConfig,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def fake_entry(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[Any]]:
    """Install a stand-in entry point; returns the list its calls are recorded in."""

    def install(command: str, status: int = 0) -> list[Any]:
        module_name, attr = cli.ENTRY_POINTS[command]
        calls: list[Any] = []
        module = sys.modules.get(module_name)
        if not isinstance(module, types.ModuleType):  # not imported (or not built yet)
            module = types.ModuleType(module_name)

        def entry(*args: Any) -> int:
            calls.append(args[0] if len(args) == 1 else args)
            return status

        monkeypatch.setitem(sys.modules, module_name, module)
        monkeypatch.setattr(module, attr, entry, raising=False)
        return calls

    return install


def run(capsys: pytest.CaptureFixture[str], *argv: str,
        env: dict[str, str] | None = None) -> tuple[int, str, str]:
    status = cli.main(list(argv), env={} if env is None else env)
    out, err = capsys.readouterr()
    return status, out, err


# -- usage errors: exit 2, one line naming the problem --------------------------


def test_unknown_flag_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "serve", "--bogus")
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("podterm serve: unrecognized argument '--bogus'")


def test_unknown_flag_suggests_the_close_one(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "serve", "--lisen", "127.0.0.1:0")
    assert status == 2
    assert "'--lisen'; did you mean --listen?" in err


def test_abbreviations_are_not_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "serve", "--gra", "1m")
    assert status == 2 and "'--gra'" in err


def test_bad_value_exits_2_naming_flag_and_value(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "serve", "--grace", "10x")
    assert status == 2
    assert err.count("\n") == 1
    assert err.startswith("podterm serve: --grace: invalid duration '10x'")
    assert "90s" in err


def test_bad_choice_lists_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "serve", "--upstream=k8s")
    assert status == 2
    assert "--upstream: invalid value 'k8s': expected one of local, kube, agent" in err


def test_bad_env_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "doctor", env={"PODTERM_LISTEN": "nowhere"})
    assert status == 2 and "PODTERM_LISTEN: invalid value 'nowhere'" in err


def test_bad_config_file_key_exits_2(capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    path = tmp_path / "serve.toml"
    path.write_text('[sessions]\ngrase = "1m"\n')
    status, _, err = run(capsys, "serve", "--config", str(path))
    assert status == 2
    assert "unknown key in [sessions] 'grase'" in err and "did you mean 'grace'" in err


def test_missing_argument_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "attach")
    assert status == 2 and err.startswith("podterm attach: the following arguments are required")


def test_unknown_command_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "srve")
    assert status == 2 and "invalid choice: 'srve'" in err and "'serve'" in err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys)
    assert status == 2 and out == "" and err.startswith("usage: podterm")


def test_client_flag_on_server_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "--server", "https://gw", "serve")
    assert status == 2 and "--server applies only to the client commands" in err


def test_dashdash_only_for_exec_and_bench(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "attach", "abc", "--", "ls")
    assert status == 2 and "unexpected arguments after '--'" in err


# -- help and version ------------------------------------------------------------


@pytest.mark.parametrize("path", [
    [], ["serve"], ["agent"], ["exec"], ["attach"], ["join"], ["kill"], ["sessions"],
    ["replay"], ["kubeconfig"], ["certs"], ["certs", "init"], ["policy"], ["policy", "check"],
    ["doctor"], ["version"], ["bench"],
])
def test_help_at_every_level(capsys: pytest.CaptureFixture[str], path: list[str]) -> None:
    status, out, err = run(capsys, *path, "-h")
    assert status == 0 and err == ""
    assert out.startswith("usage: " + " ".join(["podterm", *path]))


def test_serve_help_shows_every_flag_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "serve", "--help")
    for setting in SERVE_SETTINGS:
        if setting.flag:
            assert setting.flag_name in out
            assert setting.env_name in out


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"podterm {__version__}\n", "")


def test_version_verbose_prints_codec_line(capsys: pytest.CaptureFixture[str]) -> None:
    from podterm.protocol import codec

    status, out, _ = run(capsys, "version", "--verbose")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == f"podterm {__version__}"
    assert f"codec: {codec.IMPL} ({codec.REASON})" in lines
    assert any(line.startswith("trio: ") for line in lines)


def test_python_m_podterm_version() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "podterm", "--version"], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"podterm {__version__}\n", "")


# -- dispatch --------------------------------------------------------------------


def test_not_available_in_this_build(capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "podterm.recording.replay", None)  # import fails
    status, out, err = run(capsys, "replay", "session.cast")
    assert (status, out, err) == (1, "", "podterm replay: not available in this build\n")


def test_not_available_checks_config_first(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "podterm.gateway.server", None)
    assert run(capsys, "serve", "--grace", "x")[0] == 2
    assert run(capsys, "serve")[:3] == (1, "", "podterm serve: not available in this build\n")


def test_serve_passes_the_config(capsys: pytest.CaptureFixture[str],
                                 fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("serve", status=0)
    status, _, _ = run(capsys, "serve", "--listen", "127.0.0.1:0", "--no-proxy-protocol",
                       env={"PODTERM_GRACE": "5m", "PODTERM_LOG_FORMAT": "json"})
    assert status == 0
    (config,) = calls
    assert isinstance(config, ServeConfig)
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 0)
    assert config.sessions.grace_s == 300.0
    assert config.logging.format == "json"


def test_agent_passes_the_config(capsys: pytest.CaptureFixture[str],
                                 fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("agent")
    status, _, _ = run(capsys, "agent", "--gateway", "https://gw:443", "--token-file", "/t",
                       "--echo", env={"POD_NAMESPACE": "prod", "POD_NAME": "web-0"})
    assert status == 0
    (config,) = calls
    assert isinstance(config, AgentConfig)
    assert (config.gateway, config.namespace, config.pod, config.echo) == (
        "https://gw:443", "prod", "web-0", True)


def test_agent_own_ca_flag_is_not_the_client_flag(
        capsys: pytest.CaptureFixture[str], fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("agent")
    status, _, _ = run(capsys, "agent", "--gateway", "https://gw", "--ca", "/ca.pem",
                       "--token-file", "/t", "--namespace", "ns", "--pod", "p")
    assert status == 0 and calls[0].ca_file == "/ca.pem"
    assert run(capsys, "--ca", "/ca.pem", "agent", "--gateway", "https://gw")[0] == 2


def test_client_flag_after_the_command_wins(
        capsys: pytest.CaptureFixture[str], fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("sessions")
    run(capsys, "--server", "https://before", "sessions", "--server", "https://after")
    assert calls[0].server == "https://after"


def test_exec_builds_client_options(capsys: pytest.CaptureFixture[str],
                                    fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("exec", status=42)
    status, _, _ = run(capsys, "--server", "https://gw.example:8443", "exec", "prod/web-0",
                       "-it", "-c", "app", "--upstream", "kube", "--", "sh", "-c", "exit 3",
                       "--", "x", env={"PODTERM_TOKEN": "tok.en", "TERM": "xterm"})
    assert status == 42  # the remote command's status passes through
    (options,) = calls
    assert options == ClientOptions(
        server="https://gw.example:8443", token="tok.en", namespace="prod", pod="web-0",
        container="app", command=("sh", "-c", "exit 3", "--", "x"), stdin=True, tty=True,
        upstream="kube", term="xterm")


def test_exec_with_command_and_no_flags_is_not_interactive(
        capsys: pytest.CaptureFixture[str], fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("exec")
    run(capsys, "exec", "web-0", "--", "date")
    (options,) = calls
    assert (options.namespace, options.pod, options.command) == (None, "web-0", ("date",))
    assert (options.stdin, options.tty) == (False, False)


def test_exec_without_command_is_an_interactive_shell(
        capsys: pytest.CaptureFixture[str], fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("exec")
    run(capsys, "exec", "web-0", "--server", "http://127.0.0.1:9")
    (options,) = calls
    assert (options.command, options.stdin, options.tty) == ((), True, True)
    assert options.server == "http://127.0.0.1:9"


def test_exec_command_must_follow_dashdash(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "exec", "web-0", "ls")
    assert status == 2 and "podterm exec web-0 -- ls" in err


def test_exec_bad_target(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "exec", "Prod/Web")
    assert status == 2 and "invalid value 'Prod/Web'" in err and "[NAMESPACE/]POD" in err


@pytest.mark.parametrize("command", ["attach", "join", "kill"])
def test_session_commands(capsys: pytest.CaptureFixture[str],
                          fake_entry: Callable[..., list[Any]], command: str) -> None:
    calls = fake_entry(command, status=3)
    assert run(capsys, command, "7f3a-01", env={"PODTERM_SERVER": "https://gw"})[0] == 3
    (options,) = calls
    assert (options.session_id, options.server) == ("7f3a-01", "https://gw")


def test_session_id_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "kill", "../admin")
    assert status == 2 and "invalid session id '../admin'" in err


def test_sessions_flags(capsys: pytest.CaptureFixture[str],
                        fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("sessions")
    run(capsys, "sessions", "-A", "-o", "json")
    run(capsys, "sessions")
    assert [(o.all_sessions, o.output) for o in calls] == [(True, "json"), (False, "table")]
    assert run(capsys, "sessions", "-o", "yaml")[0] == 2


def test_kubeconfig_options(capsys: pytest.CaptureFixture[str],
                            fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("kubeconfig")
    run(capsys, "kubeconfig", "--context-name", "gw", "--insecure-skip-tls-verify",
        env={"PODTERM_SERVER": "https://gw", "PODTERM_TOKEN": "t"})
    assert calls == [KubeconfigOptions(server="https://gw", token="t", insecure=True,
                                       context_name="gw")]


def test_replay_options(capsys: pytest.CaptureFixture[str],
                        fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("replay")
    run(capsys, "replay", "s.cast", "--speed", "2", "--idle-limit", "1.5")
    run(capsys, "replay", "s.cast", "--idle-limit", "500ms")
    assert calls == [ReplayOptions("s.cast", 2.0, 1.5), ReplayOptions("s.cast", 1.0, 0.5)]
    status, _, err = run(capsys, "replay", "s.cast", "--speed", "0")
    assert status == 2 and "--speed: invalid value '0'" in err


def test_certs_init(capsys: pytest.CaptureFixture[str],
                    fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("certs init")
    assert run(capsys, "certs", "init", "dev-certs")[0] == 0
    assert calls == [CertsInitOptions("dev-certs")]


def test_policy_check_subject(capsys: pytest.CaptureFixture[str],
                              fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("policy check")
    run(capsys, "policy", "check", "alice:dev,podterm:users", "exec", "prod/web-0",
        env={"PODTERM_POLICY": "p.yaml"})
    run(capsys, "policy", "check", "system:serviceaccount:ci:bot", "--group", "ci",
        "attach", "x", "--policy", "q.yaml")
    assert calls == [
        PolicyCheckOptions("alice", ("dev", "podterm:users"), "exec", "prod/web-0", "p.yaml"),
        PolicyCheckOptions("system:serviceaccount:ci:bot", ("ci",), "attach", "x", "q.yaml"),
    ]


def test_bench_passes_arguments_through(capsys: pytest.CaptureFixture[str],
                                        fake_entry: Callable[..., list[Any]]) -> None:
    calls = fake_entry("bench")
    run(capsys, "bench", "capacity", "--sessions", "1000", "--", "--extra")
    assert calls == [BenchOptions("capacity", ("--sessions", "1000", "--extra"))]


# -- doctor ------------------------------------------------------------------------


def test_doctor_reports_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    from podterm.protocol import codec

    status, out, _ = run(capsys, "doctor", "--listen", "127.0.0.1:0",
                         env={"SHELL": "/bin/sh"})
    assert status == 0, out
    names = {line.split()[1] for line in out.splitlines()[:-1]}
    assert {"version", "python", "trio", "codec", "fd-limit", "listen", "tls", "store",
            "upstream"} <= names
    assert f"codec     {codec.IMPL}" in out.replace("ok    ", "").replace("warn  ", "")
    assert out.splitlines()[-1].startswith("0 failed")


def test_doctor_fails_on_unreadable_tls_files(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    status, out, _ = run(capsys, "doctor", "--listen", "127.0.0.1:0",
                         "--tls-cert", str(tmp_path / "no.crt"),
                         "--tls-key", str(tmp_path / "no.key"), env={"SHELL": "/bin/sh"})
    assert status == 1
    assert any(line.startswith("fail  tls") for line in out.splitlines())


def test_doctor_warns_on_plain_http_beyond_loopback() -> None:
    from podterm import doctor
    from podterm.config import load_serve_config

    config = load_serve_config({"listen": "0.0.0.0:0"}, {})
    checks = doctor.run_checks(config, {})
    assert any(c.name == "listen" and c.status is doctor.Status.WARN for c in checks)


def test_doctor_probes_the_kubeconfig_apiserver(tmp_path: Path) -> None:
    import socket

    from podterm import doctor
    from podterm.config import load_serve_config

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
current-context: dev
contexts: [{{name: dev, context: {{cluster: c1, user: u1}}}}]
clusters: [{{name: c1, cluster: {{server: "https://127.0.0.1:{port}"}}}}]
users: [{{name: u1, user: {{token: t}}}}]
""")
        config = load_serve_config({"upstream": "kube", "kubeconfig": str(kubeconfig),
                                    "listen": "127.0.0.1:0"}, {})
        (check,) = [c for c in doctor.run_checks(config, {}) if c.name == "apiserver"]
        assert check.status is doctor.Status.OK, check
        missing = load_serve_config({"upstream": "kube", "kubeconfig": str(kubeconfig),
                                     "context": "prod", "listen": "127.0.0.1:0"}, {})
        (check,) = [c for c in doctor.run_checks(missing, {}) if c.name == "apiserver"]
        assert check.status is doctor.Status.FAIL and "'prod' not found" in check.detail


# -- logs ----------------------------------------------------------------------------


def test_json_log_lines_carry_extra_fields() -> None:
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    logging.getLogger("podterm.test").info("session.attach.%s", "complete",
                                           extra={"session": "7f3a", "offset": 4096})
    logging.getLogger("podterm.test").debug("not shown")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "info" and record["logger"] == "podterm.test"
    assert record["message"] == "session.attach.complete"
    assert (record["session"], record["offset"]) == ("7f3a", 4096)
    assert record["time"].endswith("Z")


def test_logs_redact_secrets() -> None:
    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    log = logging.getLogger("podterm.test")
    log.info("open http://127.0.0.1:7780/#token=abc123 with Bearer xyz789",
             extra={"token": "t0k", "resume_token": "r3s", "user": "alice",
                    "headers": [(b"authorization", b"Bearer h3ad"), (b"host", b"gw")],
                    "body": {"password": "pw", "name": "n"}})
    text = stream.getvalue()
    for secret in ("abc123", "xyz789", "t0k", "r3s", "h3ad", "pw"):
        assert secret not in text
    record = json.loads(text)
    assert record["user"] == "alice" and record["body"]["name"] == "n"
    assert record["token"] == logs.REDACTED


def test_text_log_format_and_per_logger_levels() -> None:
    stream = io.StringIO()
    logs.configure("text", "warning", levels=[("podterm.net", "debug")], stream=stream)
    logging.getLogger("podterm.net.tls").debug("handshake %s", "ok", extra={"peer": "a b"})
    logging.getLogger("podterm.other").info("hidden")
    (line,) = stream.getvalue().splitlines()
    assert " DEBUG   podterm.net.tls: handshake ok peer=\"a b\"" in line
    logging.getLogger("podterm.net").setLevel(logging.NOTSET)


# -- the reference stays complete -------------------------------------------------


def test_docs_cli_md_lists_every_flag_variable_and_key() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    for setting in SERVE_SETTINGS + AGENT_SETTINGS + CLIENT_SETTINGS:
        if setting.flag:
            assert f"`{setting.flag_name}" in text, setting.flag_name
        if setting.env:
            assert f"`{setting.env_name}`" in text, setting.env_name
        for key in setting.file_keys:
            assert f"`{key}`" in text, key
    for command in cli.ENTRY_POINTS:
        assert f"## podterm {command}" in text or f"podterm {command}" in text, command
