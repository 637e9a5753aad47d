"""Every Triton kernel of the project compiles for Ascend 910B and A3 (benchmarks/ascend_compile.py, run in a
triton-ascend venv), and the check can fail: a tile too big for the UB is rejected. Slow (minutes): CI runs it
with `python -m pytest -m slow`."""

import os
import subprocess

import pytest

from tests.ascend_env import ROOT, ascend_python

pytestmark = pytest.mark.slow
SCRIPT = str(ROOT / "benchmarks" / "ascend_compile.py")


def test_an_oversized_tile_is_rejected():
    r = subprocess.run([ascend_python(), SCRIPT, "--self-test"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rejected" in r.stdout and "ub overflow" in r.stdout


def test_every_kernel_variant_compiles_for_ascend(capsys):
    r = subprocess.run([ascend_python(), SCRIPT, "--jobs", str(os.cpu_count() or 1)], capture_output=True, text=True,
                       timeout=3600, cwd=ROOT)
    lines = r.stdout.splitlines()
    failures = [line for i, line in enumerate(lines) if line.startswith("FAIL")]
    with capsys.disabled():
        print("\n" + (lines[-1] if lines else r.stderr[-2000:]))
    assert r.returncode == 0 and not failures, "\n".join(failures[:20]) or r.stderr[-3000:]
    assert "0 failed" in lines[-1]
