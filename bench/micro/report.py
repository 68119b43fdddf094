"""Run the frame micro-benchmarks once and write their table into docs/benchmarks.md.

Usage (from the project root)::

    .venv/bin/python bench/micro/report.py                  # run, then write the section
    .venv/bin/python bench/micro/report.py --json r.json    # write from an earlier run's JSON

It runs ``python -m pytest bench/micro --benchmark-json=FILE`` and replaces (or
appends) the section "## Micro: frame parse and serialize" of
``docs/benchmarks.md``; other sections of that file are left alone.  Every
ratio comes from this one run.  Throughput uses each case's best round
(pytest-benchmark's ``min``), the usual choice for micro-benchmarks on a
shared machine: interference only ever makes a round slower.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Micro: frame parse and serialize"
SIZES = [1, 16, 4096, 65536]
# Issue 2, Done-when: (size, contender, minimum ratio native/contender)
TARGETS = [(65536, "wsproto", 10.0), (16, "wsproto", 30.0), (65536, "picows", 1.0), (16, "picows", 1.0)]


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 else f"{size} B"


def pytest_command(json_path: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "bench/micro", "-q", "-p", "no:cacheprovider",
            f"--benchmark-json={json_path}"]


def run_benchmarks(json_path: str) -> None:
    subprocess.run(pytest_command(json_path), cwd=ROOT, check=True)


def load(json_path: str) -> tuple[dict[tuple[Any, ...], dict[str, float]], dict[str, Any]]:
    """{(kind, impl, size[, call, role]): {"mbps": ..., "fps": ...}}, plus the raw document."""
    with open(json_path) as f:
        doc = json.load(f)
    results: dict[tuple[Any, ...], dict[str, float]] = {}
    for bench in doc["benchmarks"]:
        info = bench["extra_info"]
        best = bench["stats"]["min"]
        key: tuple[Any, ...] = (info["kind"], info["impl"], info["size"])
        if info["kind"] == "serialize":
            key += (info["call"], info["role"])
        results[key] = {"mbps": info["bytes"] / best / 1e6, "fps": info["frames"] / best,
                        "frames": info["frames"]}
    return results, doc


def rate(r: dict[str, float] | None) -> str:
    if r is None:
        return "n/a"
    mbps, fps = r["mbps"], r["fps"]
    m = f"{mbps:,.0f}" if mbps >= 10 else f"{mbps:.1f}"
    f = f"{fps / 1e6:.2f} M" if fps >= 1e6 else f"{fps / 1e3:.1f} k" if fps >= 1e3 else f"{fps:.0f} "
    return f"{m} MB/s · {f}frames/s"


def ratio(a: dict[str, float] | None, b: dict[str, float] | None) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{a['fps'] / b['fps']:.1f}x"


def environment(doc: dict[str, Any], load_before: tuple[float, float, float] | None) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = []
    for dist in ("Cython", "wsproto", "picows", "pytest-benchmark"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    when = doc.get("datetime") or datetime.datetime.now(datetime.UTC).isoformat()
    load_text = (f"; load average before the run {load_before[0]:.2f}" if load_before else "")
    return (f"Run {when[:19]} UTC on {cpu}, {os.cpu_count()} CPUs{load_text}; "
            f"Python {platform.python_version()}; {', '.join(versions)}.")


def render(results: dict[tuple[Any, ...], dict[str, float]], doc: dict[str, Any],
           load_before: tuple[float, float, float] | None) -> str:
    lines = [SECTION, ""]
    lines += [
        "Command (from the project root; it runs the benchmarks once and rewrites this section):",
        "",
        "```",
        ".venv/bin/python bench/micro/report.py",
        "# which runs: python -m pytest bench/micro -q -p no:cacheprovider --benchmark-json=FILE",
        "```",
        "",
        environment(doc, load_before),
        "Throughput is from each case's best round; all ratios come from this one run.",
        "",
        "### Parse + unmask",
        "",
        "One `feed` of about 1 MiB of masked client frames (binary, FIN), server role.",
        "MB/s counts wire bytes (headers included). Every contender parses every header,",
        "unmasks every payload and returns every payload as a new object.",
        "What each contender runs is described in `bench/micro/test_parse_bench.py`.",
        "",
        "| payload | frames per feed | native | python twin | wsproto | picows "
        "| native / python | native / wsproto | native / picows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in SIZES:
        n = results.get(("parse", "native", size))
        p = results.get(("parse", "python", size))
        w = results.get(("parse", "wsproto", size))
        c = results.get(("parse", "picows", size))
        frames = int(n["frames"]) if n else 0
        lines.append(f"| {size_label(size)} | {frames:,} | {rate(n)} | {rate(p)} | {rate(w)} "
                     f"| {rate(c)} | {ratio(n, p)} | {ratio(n, w)} | {ratio(n, c)} |")
    lines += ["", "Targets of issue 2 (native parse throughput relative to the contender):", ""]
    unmet = []
    for size, other, want in TARGETS:
        n = results.get(("parse", "native", size))
        o = results.get(("parse", other, size))
        if n is None or o is None:
            lines.append(f"- {size_label(size)} vs {other}: at least {want:g}x — not measured")
            unmet.append(f"{size_label(size)} vs {other}")
            continue
        got = n["fps"] / o["fps"]
        ok = got >= want
        if not ok:
            unmet.append(f"{size_label(size)} vs {other}")
        lines.append(f"- {size_label(size)} vs {other}: at least {want:g}x — measured {got:.1f}x "
                     f"— {'met' if ok else 'NOT MET'}")
    lines += [
        "",
        "### Serialize",
        "",
        f"{SERIALIZE_FRAMES_TEXT} from one payload. MB/s counts payload bytes in. `encode_message` writes",
        "a 1-byte prefix plus the payload as one frame (wsproto: `send_data(prefix + payload)`).",
        "Server role writes unmasked frames; client role masks with a key the caller supplies",
        "(wsproto's `os.urandom` key is replaced by a constant for the run).",
        "",
        "| call | role | payload | native | python twin | wsproto | native / python | native / wsproto |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for call in ("encode_frame", "encode_message"):
        for role in ("server", "client"):
            for size in SIZES:
                n = results.get(("serialize", "native", size, call, role))
                p = results.get(("serialize", "python", size, call, role))
                w = results.get(("serialize", "wsproto", size, call, role))
                lines.append(f"| `{call}` | {role} | {size_label(size)} | {rate(n)} | {rate(p)} "
                             f"| {rate(w)} | {ratio(n, p)} | {ratio(n, w)} |")
    lines.append("")
    if unmet:
        print("targets not met: " + ", ".join(unmet), file=sys.stderr)
    return "\n".join(lines)


SERIALIZE_FRAMES_TEXT = "512 frames per round"


def write_section(text: str) -> None:
    """Replace our section of docs/benchmarks.md (up to the next ``## ``), or append it."""
    if DOC.exists():
        old = DOC.read_text().splitlines()
    else:
        old = ["# Benchmarks", "", "Measured results, with the command that produced each.", ""]
    try:
        start = old.index(SECTION)
    except ValueError:
        new = old + ([""] if old and old[-1] else []) + text.splitlines()
    else:
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
        tail = old[end:]
        new = old[:start] + text.splitlines() + ([""] if tail else []) + tail
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(new).rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="render from this pytest-benchmark JSON instead of running")
    args = ap.parse_args(argv)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        path = args.json
        load_before = None
    else:
        results_dir = ROOT / "bench" / "results"  # git-ignored
        results_dir.mkdir(parents=True, exist_ok=True)
        path = str(results_dir / "micro.json")
        run_benchmarks(path)
    results, doc = load(path)
    text = render(results, doc, load_before)
    write_section(text)
    print(text)
    print(f"\nwrote {DOC.relative_to(ROOT)} (raw results: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
