"""Every Triton kernel variant the launchers pick compiles for Ascend 910B / A3 (benchmarks/compile_check.py in a
triton-ascend venv) and for NVIDIA sm_80 / sm_89 / sm_90 (Triton's own compiler, ptxas and cuobjdump, no GPU):
without spills and within each part's on-chip memory; and the check can fail: oversized tiles are rejected. Slow
(minutes): CI runs it with `python -m pytest -m slow`."""

import os
import subprocess
import sys

import pytest

from tests.ascend_env import ROOT, ascend_python

pytestmark = pytest.mark.slow
SCRIPT = str(ROOT / "benchmarks" / "compile_check.py")
JOBS = str(os.cpu_count() or 1)


def _check(python: str, *args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([python, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _all_ok(r: subprocess.CompletedProcess, capsys) -> None:
    lines = r.stdout.splitlines()
    failures = [line for i, line in enumerate(lines) if line.startswith("FAIL")]
    with capsys.disabled():
        print("\n" + (lines[-1] if lines else r.stderr[-2000:]))
    assert r.returncode == 0 and not failures, "\n".join(failures[:20]) or r.stderr[-3000:]
    assert " 0 failed" in lines[-1]


def test_an_oversized_tile_is_rejected_for_ascend():
    r = _check(ascend_python(), "ascend", "--self-test", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rejected" in r.stdout and "ub overflow" in r.stdout


def test_every_glm45v_and_glm45_kernel_variant_compiles_for_ascend(capsys):
    """GLM-4.5V's and GLM-4.5's variants (GLM-4.5-Air has GLM-4.5V's text shapes); the tiny test configs' and
    GLM-4.5-Air's run by hand (`python benchmarks/compile_check.py ascend`, about 8 minutes on two cores)."""
    _all_ok(_check(ascend_python(), "ascend", "--models", "glm-4.5v,glm-4.5", "--jobs", JOBS), capsys)


def test_oversized_tiles_are_rejected_for_cuda():
    """A MoE tile over any part's shared memory, and a decode tile that spills."""
    r = _check(sys.executable, "cuda", "--self-test", timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "shared memory" in r.stdout and "spills" in r.stdout and "ACCEPTED" not in r.stdout


def test_every_glm45v_kernel_variant_compiles_for_cuda(capsys):
    """GLM-4.5V's variants on sm_80 and sm_90 (its FP8 ones on sm_89 too). The other models' and the tiny test
    configs' run by hand (`python benchmarks/compile_check.py cuda`, about 25 minutes on two cores)."""
    r = _check(sys.executable, "cuda", "--models", "glm-4.5v", "--jobs", JOBS)
    _all_ok(r, capsys)
    assert "_decode_kernel" in r.stdout and "_gate_up_kernel" in r.stdout  # the table of registers and memory
