"""glm45v info: devices, backend, versions, the path each op takes, and a model summary."""

from __future__ import annotations

import importlib.metadata as md

import torch
from rich.console import Group
from rich.table import Table

from .. import platform


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
                expert_parallel: bool = True, revision: str | None = None) -> Group:
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

        cfg = load_config(resolve_model(model, revision, config_only=True)[0])
        parts.append(model_summary(model, cfg))
        parts.append(memory_plan(cfg, device, platform.pick_dtype(dtype, device), tp, expert_parallel))
    return Group(*parts)


def memory_plan(cfg, device: torch.device, dtype: torch.dtype, tp: int, expert_parallel: bool) -> Table:
    """Per-device weight bytes and what is left for the KV cache, for tp devices (counted, not allocated)."""
    from ..engine.memory import available_bytes, kv_bytes_per_token, weight_bytes_per_rank
    from ..model.glm4v_moe import check_layout
    from ..parallel.layout import Layout

    layout = Layout(0, tp, expert_parallel)
    check_layout(cfg, layout)
    weights = weight_bytes_per_rank(cfg, layout, dtype)
    per_token = kv_bytes_per_token(cfg, layout, dtype)
    have = available_bytes(device)
    kind = "host memory available" if device.type == "cpu" else f"{device.type} memory"
    left = have - weights * (tp if device.type == "cpu" else 1)
    t = Table(title=f"memory plan: {tp} device(s), {'expert' if expert_parallel else 'tensor'}-parallel experts, "
              f"{str(dtype).removeprefix('torch.')}", show_header=False)
    t.add_column()
    t.add_column(justify="right")
    t.add_row("weights per device", f"{weights / 2**30:.2f} GiB")
    t.add_row("KV cache per token per device", f"{per_token / 2**10:.1f} KiB")
    t.add_row(kind, f"{have / 2**30:.1f} GiB")
    if left > 0:
        t.add_row("KV capacity (all the rest)", f"{int(left // per_token):,} tokens")
    else:
        t.add_row("fits", f"[red]no: {-left / 2**30:.1f} GiB short[/red]")
    return t


def model_summary(model: str, cfg) -> Table:
    """Counts from the config alone: the model is built on the meta device, nothing is read or allocated."""
    from ..model.glm4v_moe import Glm4vMoe

    with torch.device("meta"):
        m = Glm4vMoe(cfg)
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
    ]
    if v is not None:
        rows.append(("vision", f"{v.depth} blocks, hidden {v.hidden_size}, patch {v.patch_size}"))
    for row in rows:
        tab.add_row(*row)
    return tab
