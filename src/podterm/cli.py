"""The ``podterm`` command (also ``python -m podterm``).

This module is the edge: it parses the command line, reads ``os.environ``
(the only module that does), builds the frozen configuration with
:mod:`podterm.config`, sets up logging, and hands over to the command's entry
point.  The entry points live in the areas that implement them and are
imported lazily, so ``podterm version`` does not pay for the gateway and a
build without an area still runs the rest:

==========================  ===================================================
command                     entry point
==========================  ===================================================
serve                       ``podterm.gateway.server.main(ServeConfig) -> int``
agent                       ``podterm.agent.main.main(AgentConfig) -> int``
exec attach join            ``podterm.client.commands.run_exec / run_attach /
sessions kill               run_join / run_sessions / run_kill(ClientOptions) -> int``
kubeconfig                  ``podterm.client.kubeconfig.main(KubeconfigOptions) -> int``
replay                      ``podterm.recording.replay.main(ReplayOptions) -> int``
certs init                  ``podterm.net.certs.main(CertsInitOptions) -> int``
policy check                ``podterm.auth.check.main(PolicyCheckOptions) -> int``
bench                       ``podterm.bench.main(BenchOptions) -> int``
doctor                      ``podterm.doctor.main(ServeConfig, env) -> int``
version                     here
==========================  ===================================================

An entry point whose module is not in this build makes the command print
``podterm CMD: not available in this build`` and exit 1.

Exit status (spec/cli.md): 0 success; 1 run-time failure with a one-line
reason on stderr; 2 usage or configuration error, with a one-line message
naming the flag, key or value; ``exec``/``attach``: the remote command's own
status, as the client entry point returns it.  ``docs/cli.md`` is the
normative reference for every command, flag and variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import math
import os
import platform
import re
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from podterm import __version__
from podterm.config import (
    AGENT_SETTINGS,
    CLIENT_SETTINGS,
    SERVE_SETTINGS,
    UPSTREAM_KINDS,
    BenchOptions,
    CertsInitOptions,
    KubeconfigOptions,
    PolicyCheckOptions,
    ReplayOptions,
    Setting,
    load_agent_config,
    load_client_options,
    load_serve_config,
    parse_target,
)
from podterm.durations import parse_duration
from podterm.errors import ConfigError, PodtermError

__all__ = ["main", "build_parser", "ENTRY_POINTS", "CLIENT_COMMANDS"]

#: Command → (module, function) called with that command's options object.
ENTRY_POINTS: dict[str, tuple[str, str]] = {
    "serve": ("podterm.gateway.server", "main"),
    "agent": ("podterm.agent.main", "main"),
    "exec": ("podterm.client.commands", "run_exec"),
    "attach": ("podterm.client.commands", "run_attach"),
    "join": ("podterm.client.commands", "run_join"),
    "sessions": ("podterm.client.commands", "run_sessions"),
    "kill": ("podterm.client.commands", "run_kill"),
    "kubeconfig": ("podterm.client.kubeconfig", "main"),
    "replay": ("podterm.recording.replay", "main"),
    "certs init": ("podterm.net.certs", "main"),
    "policy check": ("podterm.auth.check", "main"),
    "bench": ("podterm.bench", "main"),
}

#: Commands that talk to a gateway and take --server/--token/--ca/--insecure-skip-tls-verify.
CLIENT_COMMANDS = ("exec", "attach", "join", "sessions", "kill", "kubeconfig")

BENCH_KINDS = ("capacity", "relay", "handshake")

# Kubernetes names: container names are RFC 1123 labels.
_CONTAINER = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# Session ids go into URL paths: no '/', no spaces, nothing to escape.
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


# ---------------------------------------------------------------------------
# argparse that reports instead of exiting
# ---------------------------------------------------------------------------


class _UsageError(Exception):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog
        self.message = message


class _ParserExit(Exception):
    def __init__(self, status: int, message: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of calling sys.exit, so main() returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --lis must not mean --listen
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self.prog, message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _ParserExit(status, message)


# The client flags given before the command land here, apart from the
# command's own flags (the agent has a --ca of its own).
_GLOBAL = "global_"


def _add_settings(parser: argparse._ActionsContainer, settings: Sequence[Setting],
                  dest_prefix: str = "") -> None:
    """One flag per setting that has one; absent flags stay absent (SUPPRESS)."""
    for s in settings:
        if not s.flag:
            continue
        text = (s.help + (f" [{s.env_name}]" if s.env else "")).replace("%", "%%")
        dest = dest_prefix + s.dest
        if s.is_bool:
            parser.add_argument(s.flag_name, dest=dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(s.flag_name, dest=dest, metavar=s.metavar or "VALUE",
                                default=argparse.SUPPRESS, help=text,
                                action="append" if s.repeatable else "store")


def _add_config_flag(parser: argparse._ActionsContainer, what: str) -> None:
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"TOML file with {what} [PODTERM_CONFIG]")


def _wrap(text: str) -> str:
    """Fill prose paragraphs to 79 columns; keep indented (example) lines as they are."""
    paragraphs = text.split("\n\n")
    return "\n\n".join(p if p.startswith("  ") else textwrap.fill(p, 79) for p in paragraphs)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree.  Every subcommand stores ``_cmd`` and ``_parser``."""
    top = _Parser(
        prog="podterm",
        description=_wrap("podterm: a terminal gateway for Kubernetes pods whose sessions "
                          "survive dropped connections."),
        epilog=_wrap("Every flag can also come from PODTERM_<FLAG> (dashes as underscores) "
                     "and from the config file: flag > environment > file > default. "
                     "See docs/cli.md."),
    )
    top.add_argument("--version", action="version", version=f"podterm {__version__}")
    client_globals = top.add_argument_group("client flags (also accepted after the command)")
    _add_settings(client_globals, CLIENT_SETTINGS, dest_prefix=_GLOBAL)

    client_parent = _Parser(add_help=False)
    group = client_parent.add_argument_group("connection")
    _add_settings(group, CLIENT_SETTINGS)
    _add_config_flag(group, "server, token, ca (default ~/.config/podterm/config.toml)")

    serve_parent = _Parser(add_help=False)
    _add_config_flag(serve_parent, "the same keys as the flags")
    _add_settings(serve_parent, SERVE_SETTINGS)

    subs = top.add_subparsers(title="commands", metavar="COMMAND", dest="_cmd")

    def add(name: str, help: str, parents: Sequence[_Parser] = (),
            description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = subs.add_parser(
            name, help=help, description=_wrap(description or help),
            epilog=_wrap(epilog) if epilog else None, parents=list(parents))
        sub.set_defaults(_cmd=name, _parser=sub)
        return sub

    more = ("Settings without a flag, from their variable or the config file: "
            + ", ".join(s.env_name for s in SERVE_SETTINGS if s.env and not s.flag)
            + ". Reference: docs/cli.md.")
    add("serve", "run the gateway", [serve_parent],
        "Run the gateway. With no flags: local upstream, in-memory store, 127.0.0.1:7780 and a "
        "generated admin token; the web terminal URL is printed once.", epilog=more)

    agent = add("agent", "run the sidecar agent (dials out to the gateway)")
    _add_config_flag(agent, "the same keys as the flags")
    _add_settings(agent, AGENT_SETTINGS)

    exec_ = add("exec", "open a session in a pod (an interactive shell when no CMD)",
                [client_parent],
                "Open a new session; an interactive shell (stdin and tty on) when no CMD is "
                "given after '--'. Reconnects and resumes by itself.\n\n"
                "  podterm exec web-0\n  podterm exec prod/web-0 -c app -it -- bash -l")
    exec_.add_argument("target", metavar="[NS/]POD", help="the pod, optionally with namespace")
    exec_.add_argument("-c", "--container", metavar="CONTAINER", help="container name")
    exec_.add_argument("-i", "--stdin", action="store_true", help="pass stdin to the command")
    exec_.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    exec_.add_argument("--upstream", choices=UPSTREAM_KINDS,
                       help="where the shell runs (default: the gateway's)")
    exec_.add_argument("_stray", nargs="*", help=argparse.SUPPRESS)

    for name, help in (("attach", "reattach to a session as its writer"),
                       ("join", "watch a session read-only"),
                       ("kill", "end a session")):
        sub = add(name, help, [client_parent])
        sub.add_argument("session_id", metavar="ID", help="session id")

    sessions = add("sessions", "list sessions (your own; -A: all, for admins)", [client_parent])
    sessions.add_argument("-A", "--all", dest="all_sessions", action="store_true",
                          help="every user's sessions (admins)")
    sessions.add_argument("-o", "--output", choices=("wide", "json"),
                          help="output format (default: a table)")

    replay = add("replay", "play an asciicast recording")
    replay.add_argument("file", metavar="FILE", help="recording (asciicast v2)")
    replay.add_argument("--speed", metavar="X", default="1", help="playback speed (default 1)")
    replay.add_argument("--idle-limit", metavar="S",
                        help="cap pauses at S seconds (or a duration such as 2s, 500ms)")

    kubeconfig = add("kubeconfig", "print a kubeconfig that points kubectl at the gateway",
                     [client_parent])
    kubeconfig.add_argument("--context-name", metavar="NAME", default="podterm",
                            help="context (and cluster, user) name (default podterm)")
    kubeconfig.add_argument("--client-cert", metavar="FILE",
                            help="embed this client certificate (PEM) instead of a token")
    kubeconfig.add_argument("--client-key", metavar="FILE",
                            help="the private key of --client-cert (PEM, unencrypted)")

    certs = add("certs", "development certificates")
    certs_subs = certs.add_subparsers(title="actions", metavar="ACTION", dest="_action",
                                      required=True)
    certs_init = certs_subs.add_parser(
        "init", help="create a development CA, server and client certificates in DIR",
        description="Create a development CA, server and client certificates in DIR.")
    certs_init.set_defaults(_cmd="certs init", _parser=certs_init)
    certs_init.add_argument("dir", metavar="DIR", help="output directory")
    certs_init.add_argument("--hosts", action="append", default=[], metavar="HOST[,HOST...]",
                            help="extra server names or IP addresses (repeatable)")
    certs_init.add_argument("--users", action="append", default=[], metavar="USER[:GROUP,...]",
                            help="a client certificate (repeatable); default "
                                 "admin:podterm:admins and agent:podterm:agents")
    certs_init.add_argument("--force", action="store_true", help="replace existing files")

    policy = add("policy", "RBAC policy tools")
    policy_subs = policy.add_subparsers(title="actions", metavar="ACTION", dest="_action",
                                        required=True)
    check = policy_subs.add_parser(
        "check", help="explain an authorization decision",
        description="Explain an authorization decision.\n\n"
                    "  podterm policy check alice:dev,podterm:users exec prod/web-0\n\n"
                    "SUBJECT is USER[:GROUP,...], split at the first ':'. For a user name "
                    "that contains ':' (system:serviceaccount:NS:NAME, oidc:alice) give the "
                    "groups with --group; SUBJECT is then the user name as it is.")
    check.set_defaults(_cmd="policy check", _parser=check)
    check.add_argument("subject", metavar="USER[:GROUP,...]", help="who asks")
    check.add_argument("verb", metavar="VERB", help="what they want to do")
    check.add_argument("target", metavar="TARGET", help="what they want to do it to")
    check.add_argument("--policy", metavar="FILE", help="policy file [PODTERM_POLICY]")
    check.add_argument("--group", dest="groups", action="append", metavar="GROUP",
                       help="a group of the user (repeatable); SUBJECT is then not split")

    add("doctor", "check this installation and configuration", [serve_parent],
        "Check this installation and a serve configuration: codec and why, versions, fd "
        "limits, listen address, TLS files, store, upstream, files. Takes serve's flags.",
        epilog=more)

    version = add("version", "print the version")
    version.add_argument("--verbose", action="store_true",
                         help="also the codec in use and why, Python, trio, platform")

    bench = add("bench", "run a benchmark from bench/ with progress")
    bench.add_argument("kind", choices=BENCH_KINDS, help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    return top


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


class _NotAvailable(Exception):
    pass


def _entry(command: str) -> Callable[..., Any]:
    """Import the entry point of ``command``; _NotAvailable when this build lacks it."""
    module_name, attr = ENTRY_POINTS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only the target (or a package above it) missing means "not built";
        # a dependency missing inside an existing module is a real error.
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise _NotAvailable(command) from None
        raise
    func = getattr(module, attr, None)
    if not callable(func):
        raise _NotAvailable(command)
    return func  # type: ignore[no-any-return]


def _call(command: str, *args: Any) -> int:
    result = _entry(command)(*args)
    return result if isinstance(result, int) else 0


def _run_serve(ns: argparse.Namespace, env: Mapping[str, str], after: list[str]) -> int:
    config = load_serve_config(ns, env)
    _entry("serve")  # say "not available" before touching logging
    from podterm import logs

    logs.configure(config.logging.format, config.logging.level, levels=config.logging.levels)
    return _call("serve", config)


def _run_agent(ns: argparse.Namespace, env: Mapping[str, str], after: list[str]) -> int:
    config = load_agent_config(ns, env)
    _entry("agent")
    from podterm import logs

    logs.configure(config.logging.format, config.logging.level, levels=config.logging.levels)
    return _call("agent", config)


def _run_exec(ns: argparse.Namespace, env: Mapping[str, str], after: list[str]) -> int:
    if ns._stray:
        raise _UsageError(ns._parser.prog,
                          f"unexpected argument {ns._stray[0]!r}: put the command after '--', "
                          f"e.g. podterm exec {ns.target} -- {' '.join(ns._stray)}")
    namespace, pod = parse_target(ns.target)
    if ns.container is not None and not _CONTAINER.fullmatch(ns.container):
        raise ConfigError(f"-c: invalid container name {ns.container!r}: expected lower-case "
                          "letters, digits and '-', at most 63")
    command = tuple(after)
    interactive = not command  # no CMD: a shell, which needs stdin and a terminal
    options = dataclasses.replace(
        load_client_options(ns, env), namespace=namespace, pod=pod, container=ns.container,
        command=command, stdin=ns.stdin or interactive, tty=ns.tty or interactive,
        upstream=ns.upstream)
    return _call("exec", options)


def _run_session_command(ns: argparse.Namespace, env: Mapping[str, str],
                         after: list[str]) -> int:
    if not _SESSION_ID.fullmatch(ns.session_id):
        raise ConfigError(f"ID: invalid session id {ns.session_id!r}: expected letters, "
                          "digits, '.', '_' and '-'")
    options = dataclasses.replace(load_client_options(ns, env), session_id=ns.session_id)
    return _call(ns._cmd, options)


def _run_sessions(ns: argparse.Namespace, env: Mapping[str, str], after: list[str]) -> int:
    options = dataclasses.replace(load_client_options(ns, env), all_sessions=ns.all_sessions,
                                  output=ns.output or "table")
    return _call("sessions", options)


def _run_kubeconfig(ns: argparse.Namespace, env: Mapping[str, str], after: list[str]) -> int:
    client = load_client_options(ns, env)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@:-]*", ns.context_name):
        raise ConfigError(f"--context-name: invalid value {ns.context_name!r}: expected "
                          "letters, digits, '.', '_', '-', '@', ':'")
    options = KubeconfigOptions(server=client.server, token=client.token,
                                ca_file=client.ca_file, insecure=client.insecure,
                                context_name=ns.context_name, client_cert_file=ns.client_cert,
                                client_key_file=ns.client_key)
    return _call("kubeconfig", options)


def _run_replay(ns: argparse.Namespace, env: Mapping[str, str], after: list[str]) -> int:
    try:
        speed = float(ns.speed)
    except ValueError:
        speed = math.nan
    if not (math.isfinite(speed) and 0 < speed <= 1000):
        raise ConfigError(f"--speed: invalid value {ns.speed!r}: expected a number above 0, "
                          "at most 1000 (2 = twice as fast)")
    idle: float | None = None
    if ns.idle_limit is not None:
        try:  # asciinema's --idle-time-limit is plain seconds; a duration works too
            idle = float(ns.idle_limit)
        except ValueError:
            try:
                idle = parse_duration(ns.idle_limit)
            except ValueError:
                idle = math.nan
        if not (math.isfinite(idle) and idle > 0):
            raise ConfigError(f"--idle-limit: invalid value {ns.idle_limit!r}: expected "
                              "seconds above 0 (e.g. 2, 0.5) or a duration (2s, 500ms)")
    return _call("replay", ReplayOptions(file=ns.file, speed=speed, idle_limit_s=idle))


def _run_certs_init(ns: argparse.Namespace, env: Mapping[str, str], after: list[str]) -> int:
    hosts = tuple(h.strip() for v in ns.hosts for h in v.split(",") if h.strip())
    return _call("certs init", CertsInitOptions(dir=ns.dir, hosts=hosts, users=tuple(ns.users),
                                                force=ns.force))


def _split_subject(subject: str, groups: list[str] | None) -> tuple[str, tuple[str, ...]]:
    if groups is not None:
        user, found = subject, [g.strip() for g in groups]
    else:
        user, _, rest = subject.partition(":")
        found = [g.strip() for g in rest.split(",")] if rest else []
    if not user or any(not g for g in found):
        raise ConfigError(f"USER[:GROUP,...]: invalid value {subject!r}: expected a user name, "
                          "optionally ':' and comma-separated groups, e.g. alice:dev,podterm:users")
    return user, tuple(found)


def _run_policy_check(ns: argparse.Namespace, env: Mapping[str, str], after: list[str]) -> int:
    user, groups = _split_subject(ns.subject, ns.groups)
    policy = ns.policy or env.get("PODTERM_POLICY") or None
    options = PolicyCheckOptions(user=user, groups=groups, verb=ns.verb, target=ns.target,
                                 policy_file=policy)
    return _call("policy check", options)


def _run_bench(ns: argparse.Namespace, env: Mapping[str, str], after: list[str]) -> int:
    return _call("bench", BenchOptions(kind=ns.kind, args=tuple(ns.args) + tuple(after)))


def _run_doctor(ns: argparse.Namespace, env: Mapping[str, str], after: list[str]) -> int:
    config = load_serve_config(ns, env)
    from podterm import doctor

    return doctor.main(config, env, out=sys.stdout)


def _run_version(ns: argparse.Namespace, env: Mapping[str, str], after: list[str]) -> int:
    print(f"podterm {__version__}")
    if not ns.verbose:
        return 0
    from podterm.doctor import codec_info

    impl, reason = codec_info()
    print(f"codec: {impl} ({reason})")
    print(f"python: {platform.python_implementation()} {platform.python_version()} "
          f"({sys.executable})")
    try:
        trio_version = importlib.import_module("trio").__version__
    except ImportError:
        trio_version = "not installed"
    print(f"trio: {trio_version}")
    print(f"platform: {platform.platform()}")
    return 1 if impl == "unavailable" else 0


_HANDLERS: dict[str, Callable[[argparse.Namespace, Mapping[str, str], list[str]], int]] = {
    "serve": _run_serve,
    "agent": _run_agent,
    "exec": _run_exec,
    "attach": _run_session_command,
    "join": _run_session_command,
    "kill": _run_session_command,
    "sessions": _run_sessions,
    "kubeconfig": _run_kubeconfig,
    "replay": _run_replay,
    "certs init": _run_certs_init,
    "policy check": _run_policy_check,
    "bench": _run_bench,
    "doctor": _run_doctor,
    "version": _run_version,
}


def _split_dashdash(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """Split at the first ``--``: (before, after, whether there was one)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:], True
    return argv, [], False


def _unrecognized(ns: argparse.Namespace, top: argparse.ArgumentParser,
                  extras: list[str]) -> _UsageError:
    parser: argparse.ArgumentParser = getattr(ns, "_parser", top)
    first = next((e for e in extras if e.startswith("-")), extras[0])
    flag = first.split("=", 1)[0]
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    close = difflib.get_close_matches(flag, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return _UsageError(parser.prog, f"unrecognized argument {first!r}{hint}")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the ``podterm`` command line and return its exit status.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).
        env: the environment (default ``os.environ``); tests pass a dict.

    Returns:
        0, 1, 2 as in the module docstring, or the entry point's status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    environ: Mapping[str, str] = os.environ if env is None else env
    head, after, had_dashdash = _split_dashdash(args)
    parser = build_parser()
    prog = "podterm"
    try:
        try:
            ns, extras = parser.parse_known_args(head)
        except _ParserExit as exc:  # --help, --version
            if exc.message:
                sys.stderr.write(exc.message)
            return exc.status
        command = getattr(ns, "_cmd", None)
        if command is None:
            parser.print_help(sys.stderr)
            return 2
        prog = ns._parser.prog
        if extras:
            raise _unrecognized(ns, parser, extras)
        if had_dashdash and command not in ("exec", "bench"):
            raise _UsageError(prog, f"unexpected arguments after '--': {' '.join(after)!r}")
        for s in CLIENT_SETTINGS:  # client flags given before the command
            if hasattr(ns, _GLOBAL + s.dest):
                if command not in CLIENT_COMMANDS:
                    raise _UsageError(prog, f"{s.flag_name} applies only to the client "
                                            f"commands ({', '.join(CLIENT_COMMANDS)})")
                if not hasattr(ns, s.dest):  # the same flag after the command wins
                    setattr(ns, s.dest, getattr(ns, _GLOBAL + s.dest))
        return _HANDLERS[command](ns, environ, after)
    except _UsageError as exc:
        print(f"{exc.prog}: {exc.message} (see '{exc.prog} --help')", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"{prog}: {exc.message or exc}", file=sys.stderr)
        return 2
    except _NotAvailable:
        print(f"{prog}: not available in this build", file=sys.stderr)
        return 1
    except PodtermError as exc:
        print(f"{prog}: {exc.message or type(exc).__name__}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # 128 + SIGINT, as shells report it
