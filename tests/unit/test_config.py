"""podterm.config and podterm.durations: precedence, validation, error messages."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path

import pytest

from podterm.config import (
    AGENT_SETTINGS,
    CLIENT_SETTINGS,
    SERVE_SETTINGS,
    ClientOptions,
    MiB,
    ServeConfig,
    SessionsConfig,
    client_config_path,
    load_agent_config,
    load_client_options,
    load_serve_config,
    parse_size,
    parse_target,
)
from podterm.durations import format_duration, parse_duration
from podterm.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "serve.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- durations ---------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1h30m", 5400.0), ("250ms", 0.25),
    ("1.5h", 5400.0), ("2d", 172800.0), ("0", 0.0), ("0s", 0.0), ("1m30s500ms", 90.5),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "600", "10", "1x", "10 m", "-5s", "30m1h", "1m1m", "1h 30m", "m", "1.s", "s10",
])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_bare_number_error_says_unit_missing() -> None:
    with pytest.raises(ValueError, match="no unit"):
        parse_duration("600")


@pytest.mark.parametrize("seconds", [0.0, 0.25, 1.0, 90.0, 600.0, 5400.0, 86400.0 + 1.5])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_duration_prefers_whole_units() -> None:
    assert format_duration(600) == "10m"
    assert format_duration(5400) == "1h30m"
    assert format_duration(0.25) == "250ms"
    assert format_duration(0) == "0s"


# -- sizes and targets ----------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("65536", 65536), (4096, 4096), ("64KiB", 65536), ("1MiB", MiB), ("2GiB", 2 << 30),
    ("256kib", 256 * 1024), ("10B", 10),
])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1MB", "1.5MiB", "-1", "MiB", "", "1 Mi"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_target() -> None:
    assert parse_target("web-0") == (None, "web-0")
    assert parse_target("prod/web-0") == ("prod", "web-0")
    assert parse_target("kube-system/coredns-5d78c9869d-abcde") == (
        "kube-system", "coredns-5d78c9869d-abcde")


@pytest.mark.parametrize("text", ["", "Web", "a/b/c", "/pod", "ns/", "ns/_x", "-pod"])
def test_parse_target_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(repr(text))):
        parse_target(text)


# -- the serve tree --------------------------------------------------------------


def test_defaults() -> None:
    config = load_serve_config({}, {}, None)
    assert config.listen.host == "127.0.0.1"
    assert config.listen.port == 7780
    assert config.store.url == "memory://"
    assert config.upstream.kind == "local"
    assert config.upstream.shell == "/bin/sh"
    assert config.sessions == SessionsConfig()
    assert config.sessions.grace_s == 600.0
    assert config.sessions.ring_bytes == MiB
    assert config.sessions.window_bytes == 256 * 1024
    assert config.sessions.heartbeat_interval_s == 15.0
    assert config.auth.admin_token is None
    assert config.workers.count == 1  # memory:// lives in one process
    assert config.logging.format == "text"
    assert config.ready_file is None


def test_tree_is_frozen_and_slotted() -> None:
    config = load_serve_config({}, {}, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen.port = 1  # type: ignore[misc]
    for node in (config, config.listen, config.tls, config.limits, config.sessions,
                 config.store, config.auth, config.audit, config.recording, config.upstream,
                 config.workers, config.logging):
        assert not hasattr(node, "__dict__"), type(node).__name__


@pytest.mark.parametrize(("key", "env_name", "file_line", "values", "expected", "read"), [
    ("grace", "PODTERM_GRACE", 'grace = "{}"', ("1m", "2m", "3m"), (60.0, 120.0, 180.0, 600.0),
     lambda c: c.sessions.grace_s),
    ("listen", "PODTERM_LISTEN", 'listen = "{}"',
     ("127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"), (1001, 1002, 1003, 7780),
     lambda c: c.listen.port),
    ("store", "PODTERM_STORE", 'store = "{}"',
     ("sqlite:///a.db", "sqlite:///b.db", "sqlite:///c.db"),
     ("sqlite:///a.db", "sqlite:///b.db", "sqlite:///c.db", "memory://"), lambda c: c.store.url),
    ("log_format", "PODTERM_LOG_FORMAT", '[logging]\nformat = "{}"', ("json", "text", "json"),
     ("json", "text", "json", "text"), lambda c: c.logging.format),
    ("upstream", "PODTERM_UPSTREAM", 'upstream = "{}"', ("kube", "agent", "kube"),
     ("kube", "agent", "kube", "local"), lambda c: c.upstream.kind),
    ("drain_timeout", "PODTERM_DRAIN_TIMEOUT", 'drain-timeout = "{}"', ("1s", "2s", "3s"),
     (1.0, 2.0, 3.0, 25.0), lambda c: c.sessions.drain_timeout_s),
])
def test_precedence_flag_env_file_default(tmp_path: Path, key, env_name, file_line, values,
                                          expected, read) -> None:
    flag_value, env_value, file_value = values
    path = write(tmp_path, file_line.format(file_value) + "\n")
    env = {env_name: env_value}
    # Each layer, added on top of the ones below, decides the value.
    assert read(load_serve_config({}, {}, None)) == expected[3]
    assert read(load_serve_config({}, {}, path)) == expected[2]
    assert read(load_serve_config({}, env, path)) == expected[1]
    assert read(load_serve_config({key: flag_value}, env, path)) == expected[0]
    # ...and each alone overrides the default.
    assert read(load_serve_config({key: flag_value}, {}, None)) == expected[0]
    assert read(load_serve_config({}, env, None)) == expected[1]


def test_flags_from_argparse_namespace_only_count_when_typed() -> None:
    # cli.py's parser uses default=SUPPRESS: an absent flag is an absent attribute.
    ns = argparse.Namespace(_cmd="serve", grace="5m")
    config = load_serve_config(ns, {"PODTERM_GRACE": "1m", "PODTERM_STORE": "redis://r:6379/0"})
    assert config.sessions.grace_s == 300.0
    assert config.store.url == "redis://r:6379/0"


def test_nested_tables(tmp_path: Path) -> None:
    path = write(tmp_path, """
[listen]
host = "0.0.0.0"
port = 0
trusted_proxies = ["10.0.0.0/8", "fd00::/8"]

[sessions]
grace = "10m"
ring-bytes = "2MiB"
window_bytes = 65536
idle-timeout = "1h30m"

[limits]
max-sessions = 500

[auth]
admin-token = "0123456789abcdef0123"

[logging]
level = "warning,podterm.net=debug"
""")
    config = load_serve_config({}, {}, path)
    assert (config.listen.host, config.listen.port) == ("0.0.0.0", 0)
    assert config.listen.trusted_proxies == ("10.0.0.0/8", "fd00::/8")
    assert config.sessions.grace_s == 600.0
    assert config.sessions.ring_bytes == 2 * MiB
    assert config.sessions.window_bytes == 65536
    assert config.sessions.idle_timeout_s == 5400.0
    assert config.limits.max_sessions == 500
    assert config.auth.admin_token == "0123456789abcdef0123"
    assert config.logging.level == "warning"
    assert config.logging.levels == (("podterm.net", "debug"),)


def test_flag_listen_overrides_file_table(tmp_path: Path) -> None:
    path = write(tmp_path, '[listen]\nhost = "0.0.0.0"\nport = 9000\n')
    config = load_serve_config({"listen": "127.0.0.1:0"}, {}, path)
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 0)


@pytest.mark.parametrize(("text", "host", "port"), [
    ("127.0.0.1:0", "127.0.0.1", 0), ("[::1]:7780", "::1", 7780),
    ("localhost:65535", "localhost", 65535), ("0.0.0.0:443", "0.0.0.0", 443),
])
def test_listen_forms(text: str, host: str, port: int) -> None:
    config = load_serve_config({"listen": text}, {}, None)
    assert (config.listen.host, config.listen.port) == (host, port)


@pytest.mark.parametrize("text", ["7780", ":7780", "::1:7780", "host:70000", "host:", "a b:1"])
def test_listen_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--listen: invalid value .*HOST:PORT"):
        load_serve_config({"listen": text}, {}, None)


def test_port_zero_allowed_and_range_checked(tmp_path: Path) -> None:
    assert load_serve_config({}, {}, write(tmp_path, "[listen]\nport = 0\n")).listen.port == 0
    with pytest.raises(ConfigError) as err:
        load_serve_config({}, {}, write(tmp_path, "[listen]\nport = 70000\n", "b.toml"))
    assert "listen.port" in str(err.value) and "70000" in str(err.value)
    assert "from 0 to 65535" in str(err.value)


def test_unknown_file_key_names_it_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, 'grase = "10m"\n')
    with pytest.raises(ConfigError) as err:
        load_serve_config({}, {}, path)
    message = str(err.value)
    assert str(path) in message
    assert "unknown key 'grase'" in message
    assert "did you mean 'grace'?" in message
    assert "allowed:" in message and "drain-timeout" in message


def test_unknown_key_in_table_names_table(tmp_path: Path) -> None:
    path = write(tmp_path, '[sessions]\ngrase = "10m"\n')
    with pytest.raises(ConfigError, match=r"unknown key in \[sessions\] 'grase'.*'grace'"):
        load_serve_config({}, {}, path)


def test_unknown_table_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'session'"):
        load_serve_config({}, {}, write(tmp_path, '[session]\ngrace = "1m"\n'))


def test_bad_duration_names_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, '[sessions]\ngrace = "ten minutes"\n')
    with pytest.raises(ConfigError) as err:
        load_serve_config({}, {}, path)
    message = str(err.value)
    assert "sessions.grace" in message and "'ten minutes'" in message
    assert "90s" in message  # what is allowed


def test_duration_without_unit_in_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no unit"):
        load_serve_config({}, {}, write(tmp_path, "grace = 600\n"))
    assert load_serve_config({}, {}, write(tmp_path, "grace = 0\n", "z.toml")).sessions.grace_s == 0


def test_bad_env_value_names_variable() -> None:
    with pytest.raises(ConfigError, match=r"PODTERM_UPSTREAM: invalid value 'k8s': expected "
                                          r"one of local, kube, agent"):
        load_serve_config({}, {"PODTERM_UPSTREAM": "k8s"}, None)


def test_out_of_range_number() -> None:
    with pytest.raises(ConfigError, match=r"PODTERM_MAX_SESSIONS: invalid value '0'.*from 1"):
        load_serve_config({}, {"PODTERM_MAX_SESSIONS": "0"}, None)
    with pytest.raises(ConfigError, match=r"PODTERM_HEARTBEAT_INTERVAL.*'0s'"):
        load_serve_config({}, {"PODTERM_HEARTBEAT_INTERVAL": "0s"}, None)


def test_same_setting_twice_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'grace = "1m"\n[sessions]\ngrace = "2m"\n')
    with pytest.raises(ConfigError, match="same setting"):
        load_serve_config({}, {}, path)


def test_unknown_mapping_flag_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown flag '--grase'.*'--grace'"):
        load_serve_config({"grase": "1m"}, {}, None)


def test_unknown_podterm_env_is_ignored() -> None:
    # What Kubernetes injects for a Service named "podterm" (service links).
    env = {"PODTERM_PORT": "tcp://10.0.0.1:7780", "PODTERM_SERVICE_HOST": "10.0.0.1",
           "PODTERM_SERVICE_PORT": "7780", "PODTERM_PORT_7780_TCP_ADDR": "10.0.0.1"}
    assert load_serve_config({}, env, None) == load_serve_config({}, {}, None)


def test_no_setting_collides_with_kubernetes_service_links() -> None:
    names = {s.env_name for s in SERVE_SETTINGS + AGENT_SETTINGS + CLIENT_SETTINGS if s.env}
    for name in names:
        assert name != "PODTERM_PORT"
        assert not name.startswith(("PODTERM_SERVICE_", "PODTERM_PORT_")), name
        assert not name.endswith(("_SERVICE_HOST", "_SERVICE_PORT")), name


def test_empty_env_counts_as_unset() -> None:
    assert load_serve_config({}, {"PODTERM_GRACE": ""}, None).sessions.grace_s == 600.0


def test_bool_values() -> None:
    assert load_serve_config({"proxy_protocol": True}, {}, None).listen.proxy_protocol
    assert load_serve_config({}, {"PODTERM_PROXY_PROTOCOL": "yes"}, None).listen.proxy_protocol
    with pytest.raises(ConfigError, match="true or false"):
        load_serve_config({}, {"PODTERM_PROXY_PROTOCOL": "maybe"}, None)


def test_relative_paths_in_file_are_relative_to_file(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write(sub, 'tls-cert = "tls/tls.crt"\ntls-key = "/abs/tls.key"\n')
    config = load_serve_config({}, {}, path)
    assert config.tls.cert_file == str(sub.resolve() / "tls" / "tls.crt")
    assert config.tls.key_file == "/abs/tls.key"
    # Flags stay as typed: relative to the working directory.
    assert load_serve_config({"tls_cert": "a.crt", "tls_key": "a.key"}, {}, None).tls.cert_file \
        == "a.crt"


def test_config_file_from_env_and_flag(tmp_path: Path) -> None:
    a = write(tmp_path, 'grace = "1m"\n', "a.toml")
    b = write(tmp_path, 'grace = "2m"\n', "b.toml")
    assert load_serve_config({}, {"PODTERM_CONFIG": str(a)}).sessions.grace_s == 60
    assert load_serve_config({"config": str(b)}, {"PODTERM_CONFIG": str(a)}).sessions.grace_s \
        == 120


def test_missing_and_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_serve_config({}, {}, tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_serve_config({}, {}, write(tmp_path, "grace = \n"))


def test_tls_cert_needs_key() -> None:
    with pytest.raises(ConfigError, match=r"--tls-cert is set but --tls-key is not"):
        load_serve_config({"tls_cert": "c.pem"}, {}, None)
    with pytest.raises(ConfigError, match=r"PODTERM_TLS_KEY is set but --tls-cert is not"):
        load_serve_config({}, {"PODTERM_TLS_KEY": "k.pem"}, None)
    with pytest.raises(ConfigError, match="--client-ca needs TLS"):
        load_serve_config({"client_ca": "ca.pem"}, {}, None)


def test_window_must_fit_in_ring(tmp_path: Path) -> None:
    path = write(tmp_path, '[sessions]\nring-bytes = "64KiB"\nwindow-bytes = "128KiB"\n')
    with pytest.raises(ConfigError, match=r"sessions.window-bytes .* exceeds .*ring-bytes"):
        load_serve_config({}, {}, path)


def test_one_worker_unless_asked_and_any_store_may_have_more() -> None:
    # memory:// with --workers N: the supervisor gives the workers a private
    # SQLite file (docs/ha.md, Workers), so it is not an error.
    assert load_serve_config({"workers": "4"}, {}, None).workers.count == 4
    config = load_serve_config({"workers": "4", "store": "redis://r:6379/0"}, {}, None)
    assert config.workers.count == 4
    assert load_serve_config({"store": "sqlite:///tmp/p.db"}, {}, None).workers.count == 1


def test_workers_auto_is_one_per_usable_cpu(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert load_serve_config({"workers": "auto"}, {}, None).workers.count == cpus
    assert load_serve_config({}, {"PODTERM_WORKERS": "AUTO"}, None).workers.count == cpus
    path = write(tmp_path, '[workers]\ncount = "auto"\n')
    assert load_serve_config({}, {}, path).workers.count == cpus
    for bad in ("0", "auto2", "-1", "1025"):
        with pytest.raises(ConfigError, match=r"workers"):
            load_serve_config({"workers": bad}, {}, None)


def test_cluster_settings() -> None:
    config = load_serve_config({"advertise": "10.0.0.7:7780", "peer_secret_file": "/s"}, {},
                               None)
    assert (config.cluster.advertise, config.cluster.peer_secret_file) == ("10.0.0.7:7780", "/s")
    env = {"PODTERM_ADVERTISE": "[fd00::7]:443", "PODTERM_PEER_SECRET_FILE": "/run/s"}
    config = load_serve_config({}, env, None)
    assert (config.cluster.advertise, config.cluster.peer_secret_file) == ("[fd00::7]:443",
                                                                         "/run/s")
    assert load_serve_config({}, {}, None).cluster.advertise is None
    for bad in ("10.0.0.7", "10.0.0.7:0", "::1:80"):
        with pytest.raises(ConfigError, match="--advertise"):
            load_serve_config({"advertise": bad}, {}, None)


@pytest.mark.parametrize("url", ["memory://", "sqlite:///var/lib/podterm.db",
                                 "redis://redis:6379/0", "rediss://r.example:6380"])
def test_store_urls(url: str) -> None:
    assert load_serve_config({"store": url}, {}, None).store.url == url


@pytest.mark.parametrize("url", ["postgres://x", "sqlite://", "redis://", "redis://h:x/0",
                                 "redis://h:1/db", "memory"])
def test_store_url_rejects(url: str) -> None:
    with pytest.raises(ConfigError, match=r"--store: invalid value .*memory://"):
        load_serve_config({"store": url}, {}, None)


def test_admin_token_hidden_from_repr_and_checked() -> None:
    secret = "s3cr3t-token-0123456789"
    config = load_serve_config({}, {"PODTERM_ADMIN_TOKEN": secret}, None)
    assert config.auth.admin_token == secret
    assert secret not in repr(config)
    with pytest.raises(ConfigError, match="too short"):
        load_serve_config({}, {"PODTERM_ADMIN_TOKEN": "short"}, None)
    with pytest.raises(ConfigError) as err:
        load_serve_config({}, {"PODTERM_ADMIN_TOKEN": "a b" * 10}, None)
    assert "a b" not in str(err.value)  # a rejected secret is not echoed


def test_env_supplies_shell_and_kubeconfig_defaults() -> None:
    env = {"SHELL": "/bin/zsh", "KUBECONFIG": "/home/u/.kube/config"}
    config = load_serve_config({}, env, None)
    assert config.upstream.shell == "/bin/zsh"
    assert config.upstream.kubeconfig == "/home/u/.kube/config"
    # A list is kubectl's merge; podterm does not guess which one.
    assert load_serve_config({}, {"KUBECONFIG": "/a:/b"}, None).upstream.kubeconfig is None
    assert load_serve_config({}, {**env, "PODTERM_SHELL": "/bin/sh"}, None).upstream.shell \
        == "/bin/sh"


def test_log_level_syntax() -> None:
    config = load_serve_config({"log_level": "DEBUG"}, {}, None)
    assert (config.logging.level, config.logging.levels) == ("debug", ())
    with pytest.raises(ConfigError, match="--log-level: invalid value 'loud'"):
        load_serve_config({"log_level": "loud"}, {}, None)


def test_every_setting_targets_a_real_field() -> None:
    config = ServeConfig()
    for setting in SERVE_SETTINGS:
        for target in setting.targets:
            node: object = config
            for part in target.split("."):
                node = getattr(node, part)


# -- agent ---------------------------------------------------------------------


def test_agent_identity_from_downward_api() -> None:
    env = {"POD_NAMESPACE": "prod", "POD_NAME": "web-0", "PODTERM_GATEWAY": "https://gw",
           "PODTERM_TOKEN_FILE": "/var/run/secrets/tokens/podterm"}
    config = load_agent_config({}, env)
    assert (config.namespace, config.pod, config.gateway) == ("prod", "web-0", "https://gw")
    assert config.token_file == "/var/run/secrets/tokens/podterm"
    assert load_agent_config({"pod": "web-1"}, env).pod == "web-1"


def test_agent_requires_gateway_and_one_identity() -> None:
    base = {"POD_NAMESPACE": "prod", "POD_NAME": "web-0"}
    with pytest.raises(ConfigError, match="--gateway is required"):
        load_agent_config({"token_file": "t"}, base)
    with pytest.raises(ConfigError, match="exactly one identity"):
        load_agent_config({"gateway": "https://gw"}, base)
    with pytest.raises(ConfigError, match="exactly one identity"):
        load_agent_config({"gateway": "https://gw", "cert": "c", "key": "k",
                           "token_file": "t"}, base)
    with pytest.raises(ConfigError, match="--cert and --key go together"):
        load_agent_config({"gateway": "https://gw", "cert": "c"}, base)
    with pytest.raises(ConfigError, match="--namespace is required"):
        load_agent_config({"gateway": "https://gw", "token_file": "t"}, {"POD_NAME": "p"})
    with pytest.raises(ConfigError, match=r"--gateway: invalid value 'wss://gw'"):
        load_agent_config({"gateway": "wss://gw", "token_file": "t"}, base)


# -- client --------------------------------------------------------------------


def test_client_precedence(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config" / "podterm").mkdir(parents=True)
    (home / ".config" / "podterm" / "config.toml").write_text(
        'server = "https://file.example"\ntoken = "file-token"\n')
    env = {"HOME": str(home)}
    assert load_client_options({}, {}).server == ClientOptions().server
    from_file = load_client_options({}, env)
    assert (from_file.server, from_file.token) == ("https://file.example", "file-token")
    env["PODTERM_SERVER"] = "https://env.example"
    assert load_client_options({}, env).server == "https://env.example"
    assert load_client_options({}, env).token == "file-token"
    assert load_client_options({"server": "http://flag.example:8080/"}, env).server \
        == "http://flag.example:8080"


def test_client_config_path_rules(tmp_path: Path) -> None:
    assert client_config_path({"PODTERM_CONFIG": "/x.toml", "HOME": "/h"}) == (
        Path("/x.toml"), True)
    assert client_config_path({"XDG_CONFIG_HOME": "/cfg", "HOME": "/h"}) == (
        Path("/cfg/podterm/config.toml"), False)
    assert client_config_path({"HOME": "/h"}) == (Path("/h/.config/podterm/config.toml"), False)
    assert client_config_path({}) == (None, False)
    # A named file must exist; the default one need not.
    with pytest.raises(ConfigError, match="not found"):
        load_client_options({}, {"PODTERM_CONFIG": str(tmp_path / "none.toml")})
    assert load_client_options({}, {"HOME": str(tmp_path)}).token is None


def test_client_file_rejects_server_keys(tmp_path: Path) -> None:
    path = write(tmp_path, 'server = "https://x"\ngrace = "1m"\n', "client.toml")
    with pytest.raises(ConfigError, match="unknown key 'grace'"):
        load_client_options({}, {"PODTERM_CONFIG": str(path)})


def test_client_ca_and_insecure_conflict() -> None:
    with pytest.raises(ConfigError, match="--ca and --insecure-skip-tls-verify contradict"):
        load_client_options({"ca": "ca.pem", "insecure_skip_tls_verify": True}, {})


def test_client_token_rejects_header_injection() -> None:
    with pytest.raises(ConfigError, match="PODTERM_TOKEN: invalid token"):
        load_client_options({}, {"PODTERM_TOKEN": "abc\r\nX-Evil: 1"})
    options = load_client_options({}, {"PODTERM_TOKEN": "abc.def", "TERM": "xterm-256color"})
    assert options.token == "abc.def" and "abc.def" not in repr(options)
    assert options.term == "xterm-256color"


# -- upstream.impersonate and upstream.restore (issue 4) ----------------------


@pytest.mark.parametrize(("flag", "target", "env_name", "table_key", "default"), [
    ("impersonate", "impersonate", "PODTERM_IMPERSONATE", "impersonate", False),
    ("restore-shells", "restore", "PODTERM_RESTORE_SHELLS", "restore", True),
])
def test_kube_upstream_switches_flag_over_env_over_file_over_default(
        tmp_path: Path, flag: str, target: str, env_name: str, table_key: str,
        default: bool) -> None:
    from podterm.cli import build_parser

    def value(argv: list[str], env: dict[str, str]) -> object:
        # The real parser: --X / --no-X (BooleanOptionalAction); impersonation
        # needs the kube upstream, so every layer runs with it.
        flags = build_parser().parse_args(["serve", "--upstream", "kube", *argv])
        return getattr(load_serve_config(flags, env).upstream, target)

    assert value([], {}) is default
    # Each layer flips the one below it, so each must win to pass.
    table = write(tmp_path, f"[upstream]\n{table_key} = {str(not default).lower()}\n")
    assert value([], {"PODTERM_CONFIG": str(table)}) is (not default)
    flat = write(tmp_path, f"{flag} = {str(not default).lower()}\n", "flat.toml")
    assert value(["--config", str(flat)], {}) is (not default)
    env = {"PODTERM_CONFIG": str(table), env_name: "yes" if default else "no"}
    assert value([], env) is default
    assert value([f"--{flag}" if not default else f"--no-{flag}"], env) is (not default)
    with pytest.raises(ConfigError, match=f"{env_name}: invalid value 'maybe': expected "
                                          "true or false"):
        value([], {env_name: "maybe"})


def test_impersonation_needs_the_kube_upstream() -> None:
    with pytest.raises(ConfigError, match="--impersonate applies to the kube upstream, but "
                                          "--upstream is local"):
        load_serve_config({"impersonate": True}, {})
    with pytest.raises(ConfigError, match="PODTERM_IMPERSONATE applies .* PODTERM_UPSTREAM "
                                          "is agent"):
        load_serve_config({}, {"PODTERM_IMPERSONATE": "true", "PODTERM_UPSTREAM": "agent"})
    # Off is fine anywhere; restore-shells is harmless without kube sessions.
    assert not load_serve_config({"impersonate": False, "restore_shells": False}, {}) \
        .upstream.impersonate


def test_restore_shells_maps_to_the_session_limits() -> None:
    from podterm.gateway.server import session_limits
    from podterm.session.session import SessionLimits

    on = session_limits(load_serve_config({"upstream": "kube"}, {}))
    assert on.restore_upstreams == SessionLimits().restore_upstreams == frozenset({"kube"})
    off = session_limits(load_serve_config({"upstream": "kube", "restore_shells": False}, {}))
    assert off.restore_upstreams == frozenset()
    assert dataclasses.replace(off, restore_upstreams=on.restore_upstreams) == on
