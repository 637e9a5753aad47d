"""A venv for the Ascend compile check, built on first use: triton-ascend installs into the same `triton`
package as CUDA Triton, so it never shares the project's venv. The compile check reaches into triton-ascend's
private internals (the NPUUtils architecture query), hence the pinned versions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["torch==2.13.0", "triton-ascend==3.2.0", "ascendnpu-ir==1.2.0", "pybind11"]


def ascend_python() -> str:
    """The venv's python, creating the venv (about a minute, from the package index) when absent or stale."""
    venv = Path(os.environ.get("GLM45V_ASCEND_VENV") or ROOT / ".venv-ascend")
    python = venv / "bin" / "python"
    stamp = venv / "glm45v-packages.txt"
    wanted = "\n".join(PACKAGES)
    if python.exists() and stamp.is_file() and stamp.read_text() == wanted:
        return str(python)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], check=True)
    stamp.write_text(wanted)
    return str(python)
