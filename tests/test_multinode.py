"""Beyond one machine (issue 22), simulated on one: two torchrun "nodes" (separate torchrun invocations on one c10d
rendezvous endpoint, gloo) running tensor / expert parallel; a node that dies or never comes; a server idling past
the process-group timeout; and captioning sharded over replicas, then merged."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glm45v_npu.engine.worker import rank_device
from glm45v_npu.errors import Glm45vError
from glm45v_npu.parallel.cluster import Torchrun
from glm45v_npu.parallel.layout import free_port
from tests.serving import wait_healthy
from tests.tiny import make_vl_checkpoint, random_image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("glm45v")
TORCHRUN_ENV = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="10.0.0.1",
                    MASTER_PORT="29500", GROUP_RANK="1")


# --- the torchrun environment, read right (no processes) ---------------------------------------------------------


def test_torchrun_layout_uses_local_rank_and_local_world(monkeypatch):
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)
    tr = Torchrun.from_env()
    assert (tr.rank, tr.world, tr.local_rank, tr.local_world, tr.node) == (3, 4, 1, 2, 1)
    import torch

    assert rank_device(torch.device("cuda"), tr.local_rank) == torch.device("cuda", 1)  # not cuda:3
    with pytest.raises(Glm45vError, match=r"--tensor-parallel-size 2, but torchrun started 4 processes"):
        tr.check(2)
    monkeypatch.delenv("MASTER_PORT")
    assert Torchrun.from_env() is None  # not all of torchrun's variables: not a torchrun launch


def test_the_cpu_fit_check_counts_this_machines_ranks_only(monkeypatch):
    import torch

    from glm45v_npu.engine import memory
    from glm45v_npu.model.hf_config import builtin_config, load_config
    from glm45v_npu.parallel.layout import Layout

    cfg = load_config(builtin_config("glm-4.5v"))
    layout = Layout(0, 16)
    per_rank = memory.weight_bytes_per_rank(cfg, layout, torch.bfloat16)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(per_rank * 2.5))
    assert memory.check_fits(cfg, layout, torch.bfloat16, torch.device("cpu"), 0.9, None, 2) == per_rank
    with pytest.raises(Glm45vError, match="16 rank"):
        memory.check_fits(cfg, layout, torch.bfloat16, torch.device("cpu"), 0.9)


# --- two simulated nodes -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("multinode")
    make_vl_checkpoint(path, "gqa2-hd32-half-rope", seed=71)
    return path


def _env(**extra) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def _nodes(args: list[str], nproc: int = 1, nodes: int = 2, join_timeout: int = 60, logs: list | None = None
           ) -> list:
    """`nodes` torchrun invocations on one rendezvous endpoint, each starting `nproc` ranks; their output piped,
    or written to `logs` (one file per node, readable while they run)."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf",
           f"join_timeout={join_timeout}", *args]
    procs = []
    for i in range(nodes):
        out = logs[i].open("w") if logs else subprocess.PIPE
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT if logs else
                                      subprocess.PIPE, text=True, start_new_session=True))
    return procs


def _finish(procs, timeout=300) -> list[tuple[int, str, str]]:
    return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]


def _same(a: list, b: list) -> None:
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"])) <= 2e-3


@pytest.mark.slow
@pytest.mark.parametrize("nproc, experts", [(1, "ep"), (1, "tp"), (2, "ep")], ids=["2x1-ep", "2x1-tp", "2x2-ep"])
def test_two_nodes_equal_one_process(ckpt, tmp_path, nproc, experts):
    one = tmp_path / "tp1.json"
    subprocess.run([sys.executable, "-m", "tests.multinode_run", str(ckpt), str(one), "1", experts], cwd=ROOT,
                   env=_env(), check=True, capture_output=True, timeout=300)
    out = tmp_path / "multi.json"
    world = 2 * nproc
    results = _finish(_nodes(["-m", "tests.multinode_run", str(ckpt), str(out), str(world), experts], nproc))
    assert all(code == 0 for code, _, _ in results), results
    _same(json.loads(out.read_text()), json.loads(one.read_text()))


@pytest.mark.slow
def test_caption_and_bench_on_two_nodes(ckpt, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        random_image(40 + 8 * i, 48, i).save(folder / f"{i}.png")
    single = tmp_path / "one.jsonl"
    subprocess.run([str(BIN), "caption", str(folder), "--out", str(single), "--model", str(ckpt), "--max-tokens", "6"],
                   env=_env(), check=True, capture_output=True, timeout=300)
    multi = tmp_path / "two.jsonl"
    results = _finish(_nodes(["-m", "glm45v_npu", "caption", str(folder), "--out", str(multi), "--model", str(ckpt),
                              "--max-tokens", "6", "-tp", "2"]))
    assert all(code == 0 for code, _, _ in results), results
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "finished")}  # noqa: E731
    lines = lambda f: [strip(json.loads(x)) for x in f.read_text().splitlines()]  # noqa: E731
    assert lines(multi) == lines(single)
    bench = _finish(_nodes(["-m", "glm45v_npu", "bench", "--model", str(ckpt), "--batch", "2", "--input-len", "8",
                            "--output-len", "4", "--json", "-tp", "2", "--tp-experts"]))
    assert all(code == 0 for code, _, _ in bench), bench
    reports = [json.loads(out) for _, out, _ in bench if out.strip()]
    assert len(reports) == 1 and reports[0]["generated_tokens"] == 8  # rank 0 reports, the follower prints nothing


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0], ids=["follower", "leader"])
def test_a_killed_node_is_named_and_nothing_is_left(ckpt, rank, tmp_path):
    """Rank 1 killed: rank 0 names it and exits non-zero. Rank 0 killed: the follower says it lost rank 0."""
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = _nodes(["-m", "glm45v_npu", "bench", "--model", str(ckpt), "--batch", "2", "--input-len", "8",
                    "--output-len", "4000", "-tp", "2", "--dist-timeout-s", "60"], logs=logs)
    deadline = time.time() + 180
    while not any("KV cache" in log.read_text() for log in logs if log.is_file()):  # rank 0 loaded: generating
        assert time.time() < deadline, "the model never loaded"
        time.sleep(0.5)
    time.sleep(3)  # mid-generation
    victim = _rank_process(rank)
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    exits = {}
    while len(exits) < 2 and time.time() - killed < 60:
        for i, p in enumerate(procs):
            if i not in exits and p.poll() is not None:
                exits[i] = (time.time() - killed, p.returncode, "", logs[i].read_text())
        time.sleep(0.2)
    assert len(exits) == 2, "a torchrun did not exit"
    assert _rank_process(0) is None and _rank_process(1) is None
    if rank == 0:
        follower = next(e for e in exits.values() if "glm45v rank 1: lost rank 0" in e[3])
        assert follower[0] < 30 and all(e[1] != 0 for e in exits.values())
        return
    leader = next(e for e in exits.values() if "died" in e[3])
    seen = leader[3]
    assert "error: tensor-parallel rank 1 (node " in seen and f"pid {victim}) died" in seen
    assert "MarkupError" not in seen  # error text printed as text: gloo's messages hold [brackets]
    assert leader[0] < 15 and leader[1] != 0 and all(e[1] != 0 for e in exits.values())
    said = next(line for line in seen.splitlines() if "died" in line)
    print(f"\nkilled rank 1: {said!r}, {leader[0]:.1f} s from the kill to torchrun's exit")


def _rank_process(rank: int) -> int | None:
    """The pid of the glm45v process torchrun started as `rank` (not torchrun itself), if any runs."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"glm45v_npu" in cmd and b"torch.distributed.run" not in cmd and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow
def test_a_node_that_never_comes_fails_the_rendezvous_in_time(ckpt):
    start = time.time()
    (code, _, err), = _finish(_nodes(["-m", "glm45v_npu", "chat", "-p", "hi", "--model", str(ckpt), "-tp", "2"],
                                     nodes=1, join_timeout=10), timeout=120)
    assert code != 0 and time.time() - start < 60
    assert "RendezvousTimeoutError" in err or "timed out" in err.lower()


@pytest.mark.slow
def test_a_server_on_two_nodes_answers_after_idling_past_the_timeout(ckpt):
    import httpx

    port = free_port()
    procs = _nodes(["-m", "glm45v_npu", "serve", "--model", str(ckpt), "--port", str(port), "-tp", "2",
                    "--dist-timeout-s", "5"])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        time.sleep(12)  # longer than the process-group timeout
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        _finish(procs, timeout=60)


# --- captioning sharded over replicas ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_caption_killed_rerun_merged_and_resharded(ckpt, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(40):
        random_image(24 + i % 7 * 4, 28, i).save(folder / f"{i:02d}.png")
    run = lambda *a, **k: subprocess.run([str(BIN), "caption", str(folder), "--model", str(ckpt), "--max-tokens", "3",  # noqa: E731
                                          "--batch", "2", *a], env=_env(), capture_output=True, text=True, timeout=600,
                                         **k)
    single = tmp_path / "single.jsonl"
    assert run("--out", str(single)).returncode == 0
    out = tmp_path / "merged.jsonl"
    assert run("--out", str(out), "--shard", "0/2").returncode == 0
    part1 = out.with_name(out.name + ".parts") / "shard-1-of-2.jsonl"
    p = subprocess.Popen([str(BIN), "caption", str(folder), "--model", str(ckpt), "--max-tokens", "3", "--batch", "1",
                          "--out", str(out), "--shard", "1/2"], env=_env(), stderr=subprocess.DEVNULL)
    while not part1.is_file() or len(part1.read_text().splitlines()) < 4:
        time.sleep(0.005)
    p.kill()  # part-way: at most its unflushed line is lost
    p.wait()
    half = len(part1.read_text().splitlines())
    assert 4 <= half < sum(1 for _ in single.read_text().splitlines()) - 20
    assert run("--out", str(out), "--shard", "1/2").returncode == 0  # finishes the shard
    merge = run("--out", str(out))
    assert merge.returncode == 0 and "merged 40 of 40" in merge.stderr, merge.stderr
    assert "nothing to caption" in merge.stderr  # both shards were complete: no model loaded
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "finished")}  # noqa: E731
    lines = lambda f: [strip(json.loads(x)) for x in f.read_text().splitlines()]  # noqa: E731
    assert lines(out) == lines(single)
    reshard = run("--out", str(out), "--shard", "2/3")
    assert reshard.returncode == 0 and "nothing to caption" in reshard.stderr
