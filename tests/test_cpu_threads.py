"""Threads on a CPU follow the cores the process may use (its affinity: taskset, cgroups, a launcher) and the
number of ranks sharing the machine (LOCAL_WORLD_SIZE under torchrun, the tensor-parallel size when spawned)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from glm45v_npu import platform
from glm45v_npu.parallel.cluster import Torchrun
from tests.cli_cases import cli_env


@pytest.mark.parametrize("allowed, local_world, shares", [
    ({0, 1, 2, 3, 4, 5, 6, 7}, 1, [[0, 1, 2, 3, 4, 5, 6, 7]]),
    ({0, 1, 2, 3, 4, 5, 6, 7}, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ({2, 3, 5}, 1, [[2, 3, 5]]),  # a cgroup or taskset with holes
    ({2, 3, 5, 9}, 2, [[2, 3], [5, 9]]),
    ({0, 1}, 4, [[0], [1], [0], [1]]),  # more ranks than cores: one core each, shared
])
def test_each_rank_takes_its_share_of_the_allowed_cores(monkeypatch, allowed, local_world, shares):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(allowed))
    assert [platform.cpu_share(r, local_world) for r in range(local_world)] == shares


def test_the_launchers_local_world_size_sets_the_share(monkeypatch):
    """Under torchrun each rank's share comes from LOCAL_RANK / LOCAL_WORLD_SIZE (not the global rank)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append(sorted(cores)))
    pinned: list = []
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h",
           "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    run = Torchrun.from_env()
    before = torch.get_num_threads()
    try:
        platform.use_cpu_share(run.local_rank, run.local_world, pin=True)
        assert torch.get_num_threads() == 4 and pinned == [[4, 5, 6, 7]]
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and two cores")
def test_an_engine_under_taskset_runs_one_thread_per_allowed_core(tmp_path):
    code = ("import torch; torch.set_num_threads(7); from glm45v_npu import LLM; "
            "llm = LLM('tiny-random', max_model_len=128); "
            "print('threads', torch.get_num_threads()); llm.close(); print('after', torch.get_num_threads())")
    env = cli_env(tmp_path)
    for cores, want in (("0", 1), ("0,1", 2)):
        out = subprocess.run(["taskset", "-c", cores, sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"threads {want}" in out.stdout, out.stdout
        assert "after 7" in out.stdout, out.stdout  # the caller's own setting comes back when the engine closes
