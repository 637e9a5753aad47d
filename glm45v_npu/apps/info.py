"""glm45v info: devices, backend, versions, the path each op takes, and a model summary."""

from __future__ import annotations

import importlib.metadata as md

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .. import platform
from ..errors import Glm45vError


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def kernel_table(device: torch.device) -> Table:
    """The path each op takes on each device type; this machine's column is marked."""
    from ..kernels import ops

    t = Table(title="kernel path per op and device type",
              caption="torch_npu ops check themselves against the twin at first use and fall back; "
                      "split_qkv_rmsnorm_rope serves decode steps, prefill takes separate ops")
    t.add_column("op", no_wrap=True)
    for kind in ("cpu", "cuda", "npu"):
        t.add_column(kind + (" (this machine)" if kind == device.type else ""))
    for op, paths in ops.describe_all().items():
        t.add_row(op, paths["cpu"], paths["cuda"], paths["npu"])
    return t


def render_info(model: str | None, device_name: str | None, dtype: str | None = None, tp: int = 1,
                expert_parallel: bool = True, revision: str | None = None, quantization: str = "auto",
                device_memory: str | None = None, gpu_memory_utilization: float = 0.9) -> Group:
    device = platform.pick_device(device_name)
    env = Table(title="environment", show_header=False)
    env.add_column()
    env.add_column()
    env.add_row("device", str(device))
    if torch.cuda.is_available():
        env.add_row("cuda devices", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
    env.add_row("npu available", str(platform.npu_available()))
    for pkg in ("torch", "torch_npu", "triton", "triton-ascend", "transformers", "safetensors"):
        env.add_row(pkg, _version(pkg))
    parts = [env, kernel_table(device)]
    if model:
        from ..model.hf_config import load_config
        from ..model.hub import resolve_model
        from ..model.quantization import read_plan

        path = resolve_model(model, revision, config_only=True)[0]
        cfg = load_config(path)
        plan = read_plan(path, quantization, device.type)
        parts.append(model_summary(model, cfg, plan))
        memory = parse_bytes(device_memory) if device_memory else None
        parts.append(memory_plan(cfg, device, platform.pick_dtype(dtype, device), tp, expert_parallel, plan, memory,
                                 gpu_memory_utilization))
    return Group(*parts)


def parse_bytes(text: str) -> int:
    """'141GiB', '80GB', '64 GiB' -> bytes."""
    units = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40, "tb": 10**12}
    s = text.strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * units[unit])
            except ValueError:
                break
    raise Glm45vError(f"--device-memory {text}: expected a size such as 141GiB or 80GB")


def memory_plan(cfg, device: torch.device, dtype: torch.dtype, tp: int, expert_parallel: bool, plan=None,
                device_memory: int | None = None, utilization: float = 0.9) -> Table:
    """Per-device weight bytes (as the engine will hold them: 8-bit where the plan says) and what is left for the
    KV cache on `device_memory` bytes per device (default: this machine's device), counted, not allocated. The
    engine takes the same figures and, on an accelerator, also subtracts a warm-up step's peak."""
    from ..engine.memory import available_bytes, kv_bytes_per_token, weight_bytes_per_rank
    from ..model.hf_config import check_layout
    from ..parallel.layout import Layout

    layout = Layout(0, tp, expert_parallel)
    check_layout(cfg, layout)
    weights = weight_bytes_per_rank(cfg, layout, dtype, plan)
    per_token = kv_bytes_per_token(cfg, layout, dtype)
    on_host = device_memory is None and device.type == "cpu"
    have = available_bytes(device) if device_memory is None else device_memory
    usable = have if on_host else int(have * utilization)
    kind = "host memory available" if on_host else f"memory per device ({utilization:.0%} usable)"
    left = usable - weights * (tp if on_host else 1)
    scheme = plan.describe() if plan is not None else "none"
    t = Table(title=f"memory plan: {tp} device(s), {'expert' if expert_parallel else 'tensor'}-parallel experts, "
              f"{str(dtype).removeprefix('torch.')}, quantization {scheme}", show_header=False)
    t.add_column()
    t.add_column(justify="right")
    t.add_row("weights per device", f"{weights / 2**30:.2f} GiB")
    t.add_row("KV cache per token per device", f"{per_token / 2**10:.1f} KiB")
    t.add_row(kind, f"{have / 2**30:.1f} GiB")
    if left > 0:
        t.add_row("KV budget (before the warm-up peak)", f"{left / 2**30:.1f} GiB")
        t.add_row("KV capacity", f"{int(left // per_token):,} tokens")
    else:
        t.add_row("fits", Text(f"no: {-left / 2**30:.1f} GiB short", style="red"))
    return t


def model_summary(model: str, cfg, plan=None) -> Table:
    """Counts from the config alone: the model is built on the meta device, nothing is read or allocated."""
    from ..model.glm4v_moe import Glm4vMoe

    with torch.device("meta"):
        m = Glm4vMoe(cfg, plan=plan)
    total = sum(p.numel() for p in m.parameters())
    vision = sum(p.numel() for p in m.visual.parameters()) if m.visual is not None else 0
    experts = sum(p.numel() for n, p in m.named_parameters() if ".experts." in n)
    t, v = cfg.text, cfg.vision
    active = total - experts + experts * t.num_experts_per_tok // t.n_routed_experts
    tab = Table(title=f"model {model}", show_header=False)
    tab.add_column()
    tab.add_column(justify="right")
    rows = [
        ("type", cfg.model_type),
        ("parameters", f"{total / 1e9:.2f} B ({active / 1e9:.2f} B active per token)"),
        ("bytes (bf16)", f"{total * 2 / 2**30:.1f} GiB"),
        ("vision parameters", f"{vision / 1e9:.3f} B"),
        ("decoder layers", f"{t.num_hidden_layers} ({t.first_k_dense_replace} dense)"),
        ("heads (q / kv) x head_dim", f"{t.num_attention_heads} / {t.num_key_value_heads} x {t.head_dim}"),
        ("routed experts", f"{t.n_routed_experts}, top-{t.num_experts_per_tok}, {t.n_shared_experts} shared"),
        ("QK norm", str(t.use_qk_norm)),
        *((f"weights: {kind}", scheme) for kind, scheme in layer_schemes(m)),
    ]
    if v is not None:
        rows.append(("vision", f"{v.depth} blocks, hidden {v.hidden_size}, patch {v.patch_size}"))
    for row in rows:
        tab.add_row(*row)
    return tab


def layer_schemes(model) -> list[tuple[str, str]]:
    """How each kind of layer is held: its quantization scheme, or the float dtype."""
    first = model.language_model.layers[-1]
    kinds = [("attention", first.self_attn.qkv_proj), ("routed experts", getattr(first.mlp, "experts", None)),
             ("shared experts", getattr(first.mlp, "shared_experts", None)), ("lm_head", model.lm_head),
             ("dense MLP", model.language_model.layers[0].mlp)]
    rows = []
    for kind, module in kinds:
        if module is None:
            continue
        quant = getattr(module, "quant", None)
        if quant is None and hasattr(module, "gate_up_proj"):
            quant = getattr(module.gate_up_proj, "quant", None)
        rows.append((kind, quant.scheme if quant is not None else "float"))
    rows += [("routers, embeddings, vision tower", "float")]
    return rows
