"""``podterm bench KIND ...`` finds ``bench/KIND/run.py`` in the checkout and runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from podterm.bench import KINDS, find_script, main  # noqa: E402
from podterm.config import BenchOptions  # noqa: E402


@pytest.mark.parametrize("kind", KINDS)
def test_find_script_in_checkout(kind: str) -> None:
    assert find_script(kind, cwd=ROOT) == ROOT / "bench" / kind / "run.py"


def test_find_script_falls_back_to_the_tree_beside_src(tmp_path: Path) -> None:
    # Run from elsewhere: the bench/ next to the imported src/ is used.
    assert find_script("relay", cwd=tmp_path) == ROOT / "bench" / "relay" / "run.py"


def test_unknown_kind_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(BenchOptions(kind="nope")) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_cli_passes_arguments_through() -> None:
    proc = subprocess.run([sys.executable, "-m", "podterm", "bench", "relay", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "--bulk-mb" in proc.stdout
    assert "podterm bench: running bench/relay/run.py --help" in proc.stderr
