"""The tile table: every launcher reads it by shape bucket; a tuned file (benchmarks/tune_moe.py) takes precedence
for the shapes it names and nothing else; the tuner runs (smoke, on the CPU) and writes what the table reads."""

import json
import subprocess
import sys

import pytest

from glm45v_npu.kernels import tiles
from glm45v_npu.kernels.tiles import MOE, Tile, moe_key, moe_tile, of, prefill_tile
from tests.ascend_env import ROOT


def test_buckets_pick_the_rows_of_the_table():
    cuda = of(MOE, "cuda", "bfloat16")
    assert moe_tile("cuda", 1, 128, 4096, 1408, "bfloat16", "none") == cuda[min(cuda)]
    assert moe_tile("cuda", 10**6, 128, 4096, 1408, "bfloat16", "none") == cuda[max(cuda)]
    assert moe_tile("cuda", 1, 128, 4096, 1408, "float32", "none") == of(MOE, "cuda", "float32")[4096]
    assert prefill_tile("cuda", 1, "bfloat16").block_m <= prefill_tile("cuda", 2048, "bfloat16").block_m
    assert prefill_tile("npu", 2048, "bfloat16") != prefill_tile("cuda", 2048, "bfloat16")


def test_a_tuned_table_wins_for_its_shapes_only(tmp_path, monkeypatch):
    key = moe_key(16, 4096, 1408, "bfloat16", "none")
    (tmp_path / "cuda.json").write_text(json.dumps({"moe": {key: {"1": [16, 64, 128, 4, 4], "64": [64, 64, 64, 8, 3]}}}))
    monkeypatch.setattr(tiles, "TUNED", tmp_path)
    tiles._tuned.cache_clear()
    try:
        assert moe_tile("cuda", 1, 16, 4096, 1408, "bfloat16", "none") == Tile(16, 64, 128, 4, 4)
        assert moe_tile("cuda", 3, 16, 4096, 1408, "bfloat16", "none") == Tile(16, 64, 128, 4, 4)  # nearest
        assert moe_tile("cuda", 50, 16, 4096, 1408, "bfloat16", "none") == Tile(64, 64, 64, 8, 3)
        assert moe_tile("cuda", 1, 128, 4096, 1408, "bfloat16", "none") == of(MOE, "cuda", "bfloat16")[512]
        assert moe_tile("npu", 1, 16, 4096, 1408, "bfloat16", "none") == MOE["npu"][128]  # no npu.json
    finally:
        tiles._tuned.cache_clear()


@pytest.mark.slow
def test_the_tuner_writes_a_table_the_launchers_read(tmp_path, monkeypatch):
    out = tmp_path / "cuda.json"
    r = subprocess.run([sys.executable, "benchmarks/tune_moe.py", "--smoke", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    written = json.loads(out.read_text())
    assert set(written["moe"]) == {moe_key(8, 64, 32, "bfloat16", "none")} and written["tuned_on"]["device"]
    monkeypatch.setattr(tiles, "TUNED", tmp_path)
    tiles._tuned.cache_clear()
    try:
        best = written["moe"][moe_key(8, 64, 32, "bfloat16", "none")]["4"]
        assert moe_tile("cuda", 4, 8, 64, 32, "bfloat16", "none") == Tile(*best)
    finally:
        tiles._tuned.cache_clear()
