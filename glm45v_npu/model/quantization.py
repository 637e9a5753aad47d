"""Which layers of a checkpoint are 8-bit and how, from the checkpoint itself: compressed-tensors'
`quantization_config` in config.json (GLM-4.5V-FP8 and what llm-compressor makes), or msmodelslim's
`quant_model_description.json` (Ascend W8A8 / W8A8_DYNAMIC); or, with `--quantization fp8` on a float checkpoint,
the decoder's linear and expert weights quantized at load (per output channel, dynamic per-token activations:
vLLM's online fp8).

Layers ask the plan by their checkpoint names. A checkpoint's ignore list may name layers the way another engine
did (`visual.blocks.1.attn.qkv_proj`, `model.layers.3.mlp.gate`): each name is matched with its aliases (with and
without `model.` / `language_model.`, fused `qkv_proj` / `gate_up_proj`). A layer the plan quantizes must then
find its scales in the checkpoint, and a scheme this runner does not run is an error that names it: never a
silent float fallback.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..kernels.quant import GROUP, QuantSpec
from .hf_config import read_json_object

log = logging.getLogger("glm45v_npu")
QUANTIZATION = ("auto", "fp8", "none")
MSMODELSLIM_FILE = "quant_model_description.json"


@dataclass(frozen=True)
class LayerQuant:
    """One layer's scheme: the kernel's spec, and how its tensors are laid out in the checkpoint."""

    spec: QuantSpec
    scheme: str  # how `glm45v info` names it: FP8_DYNAMIC, FP8_BLOCK, FP8 static, W8A16, W8A8, W8A8_DYNAMIC, ...
    weight_strategy: str = "channel"  # the checkpoint's weight scales: channel, tensor or block
    online: bool = False  # float weights, quantized while loading
    msmodelslim: bool = False  # tensor names and formulas of msmodelslim


@dataclass
class QuantPlan:
    """Per layer (by checkpoint name): its LayerQuant, or None for a float layer."""

    method: str = "none"  # "none", "compressed-tensors", "msmodelslim" or "online"
    groups: list[tuple[list[str], LayerQuant]] = field(default_factory=list)  # (targets, scheme), in order
    ignore: list[str] = field(default_factory=list)
    per_tensor: dict[str, LayerQuant] = field(default_factory=dict)  # msmodelslim: checkpoint weight name -> scheme
    dequantize: bool = False  # FP8 weights held as floats (a device without FP8 arithmetic, or --quantization none)
    source: str = ""

    @property
    def active(self) -> bool:
        return self.method != "none"

    def layer(self, names: list[str], decoder: bool = True) -> LayerQuant | None:
        """The scheme of the layer whose checkpoint parts are `names` (one for a plain layer; q/k/v or gate/up for
        a fused one, which must agree). `decoder`: a decoder linear or expert layer (online fp8 quantizes those
        only; routers, embeddings, lm_head and the vision tower never)."""
        found = {self._one(n, decoder) for n in names}
        if len(found) > 1:
            raise ConfigError(f"{self.source}: the parts of a fused layer are quantized differently ({', '.join(names)})")
        scheme = found.pop()
        if scheme is not None and not decoder and scheme.online:
            return None
        return scheme

    def _one(self, name: str, decoder: bool) -> LayerQuant | None:
        if self.method == "online":
            return self.groups[0][1] if decoder else None
        names = aliases(name)
        if self.method == "msmodelslim":
            hits = {self.per_tensor[n] for n in names if n in self.per_tensor}
            return hits.pop() if hits else None
        if self.method != "compressed-tensors" or any(_match(n, i) for n in names for i in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(t == "Linear" or _match(n, t) for n in names for t in targets):
                return scheme
        return None

    def describe(self) -> str:
        if not self.active:
            return "none (float weights)"
        schemes = sorted({s.scheme for _, s in self.groups} | {s.scheme for s in self.per_tensor.values()})
        held = ", dequantized to float at load" if self.dequantize else ""
        return f"{self.method}: {', '.join(schemes)}{held}"


def _match(name: str, target: str) -> bool:
    """compressed-tensors' rule: `re:` entries match from the start of the name, others the whole name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


_HEADS = [("model.language_model.", ("model.", "language_model.model.", "language_model.", "")),
          ("model.visual.", ("visual.", "")), ("model.", ("", "language_model.model."))]
_FUSED = [(re.compile(r"\.(q|k|v)_proj$"), ".qkv_proj"), (re.compile(r"\.(gate|up)_proj$"), ".gate_up_proj"),
          (re.compile(r"\.attn\.qkv$"), ".attn.qkv_proj"), (re.compile(r"\.experts\.\d+\.(gate|up|down)_proj$"),
                                                            ".experts")]


def aliases(name: str) -> set[str]:
    """A checkpoint module name and the names other engines gave it."""
    out = {name}
    for head, alternatives in _HEADS:
        if name.startswith(head):
            out |= {a + name[len(head):] for a in alternatives}
            break
    for pattern, fused in _FUSED:
        out |= {pattern.sub(fused, n) for n in list(out)}
    return out


def read_plan(path: str | Path, option: str = "auto", device_type: str = "cpu") -> QuantPlan:
    """The plan for a checkpoint folder under --quantization `option` on a device of `device_type`."""
    if option not in QUANTIZATION:
        raise ConfigError(f"--quantization {option}: expected one of {', '.join(QUANTIZATION)}")
    path = Path(path)
    source = str(path / "config.json")
    raw = read_json_object(path / "config.json")
    config = raw.get("quantization_config")
    found = sorted(path.glob("quant_model_description*.json"))  # msmodelslim names it after the type too
    description = path / MSMODELSLIM_FILE if (path / MSMODELSLIM_FILE).is_file() or len(found) != 1 else found[0]
    if config is not None and description.is_file():
        raise ConfigError(f"{path}: both a quantization_config and {MSMODELSLIM_FILE}; which one is meant?")
    if config is not None:
        plan = _compressed_tensors(config, source)
    elif description.is_file():
        plan = _msmodelslim(description)
    else:
        plan = QuantPlan(source=source)
    if option == "fp8":
        if plan.active:
            raise ConfigError(f"--quantization fp8: {plan.source} is already quantized ({plan.describe()}); "
                              "use --quantization auto")
        if device_type == "npu":
            raise ConfigError("--quantization fp8: Ascend NPUs have no FP8 arithmetic; use an msmodelslim W8A8 "
                              "checkpoint instead")
        spec = QuantSpec("fp8", "token")
        plan = QuantPlan("online", [(["Linear"], LayerQuant(spec, "fp8 (online, per channel)", online=True))],
                         source=source)
    fp8 = any(s.spec.weight == "fp8" for _, s in plan.groups) or any(
        s.spec.weight == "fp8" for s in plan.per_tensor.values())
    if fp8 and (option == "none" or device_type == "npu"):
        plan.dequantize = True
        log.warning("%s: FP8 weights are dequantized to float at load (%s): they take 2x the memory of FP8",
                    plan.source, "--quantization none" if option == "none" else "Ascend NPUs have no FP8 units")
    elif plan.active and option == "none":
        raise ConfigError(f"--quantization none: {plan.source} holds int8 weights ({plan.describe()}), which are "
                          "not dequantized here; use --quantization auto")
    return plan


class Schemes:
    """A plan bound to one model's names: `schemes(*our_names)` -> the scheme of the layer whose checkpoint parts
    those modules are (our names are mapped to the checkpoint's by `to_checkpoint`)."""

    def __init__(self, plan: QuantPlan | None = None, to_checkpoint=None):
        self.plan, self.to_checkpoint = plan or QuantPlan(), to_checkpoint

    def __call__(self, *ours: str, decoder: bool = True) -> LayerQuant | None:
        if not self.plan.active:
            return None
        return self.plan.layer([self.to_checkpoint(n) for n in ours], decoder)


FLOAT = Schemes()


# --- compressed-tensors -----------------------------------------------------------------------------------------


def _compressed_tensors(config: Any, source: str) -> QuantPlan:
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: quantization_config must be an object")
    method = config.get("quant_method")
    if method != "compressed-tensors":
        raise ConfigError(f"{source}: quant_method {method!r} is not supported (this runner reads "
                          "compressed-tensors FP8 checkpoints and msmodelslim W8A8; GPTQ, AWQ, bitsandbytes and "
                          "FineGrainedFP8 are not)")
    fmt = config.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ConfigError(f"{source}: compressed-tensors format {fmt!r} is not supported (float-quantized FP8 is; "
                          "pack-quantized int4, NVFP4 and mixed formats are not)")
    groups = config.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{source}: quantization_config has no config_groups")
    out = []
    for name, group in groups.items():
        where = f"{source}: config_groups.{name}"
        if not isinstance(group, dict):
            raise ConfigError(f"{where}: expected an object")
        targets = group.get("targets") or []
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"{where}.targets: expected a list of names")
        out.append((targets, _scheme(group, where)))
    ignore = config.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ConfigError(f"{source}: quantization_config.ignore must be a list of names")
    if config.get("kv_cache_scheme"):
        log.warning("%s: kv_cache_scheme is not used (the KV cache stays in the model dtype)", source)
    return QuantPlan("compressed-tensors", out, list(ignore), source=source)


def _scheme(group: dict, where: str) -> LayerQuant:
    weights, inputs = group.get("weights") or {}, group.get("input_activations")
    if group.get("output_activations"):
        raise ConfigError(f"{where}: output_activations quantization is not supported")
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ConfigError(f"{where}: weights of type {weights.get('type')!r} with {weights.get('num_bits')} bits "
                          "are not supported (only 8-bit float, FP8 e4m3)")
    if not weights.get("symmetric", True) or weights.get("dynamic"):
        raise ConfigError(f"{where}: only symmetric, static FP8 weight scales are supported")
    strategy = weights.get("strategy")
    group_k = 0
    if strategy == "block":
        if list(weights.get("block_structure") or []) != [GROUP, GROUP]:
            raise ConfigError(f"{where}: block_structure {weights.get('block_structure')} is not supported "
                              f"(only [{GROUP}, {GROUP}])")
        group_k = GROUP
    elif strategy not in ("channel", "tensor"):
        raise ConfigError(f"{where}: weight strategy {strategy!r} is not supported (channel, tensor or block)")
    if inputs is None:
        return LayerQuant(QuantSpec("fp8", "none", group_k), "W8A16 (FP8 weights)", strategy)
    if inputs.get("type") != "float" or inputs.get("num_bits") != 8 or not inputs.get("symmetric", True):
        raise ConfigError(f"{where}: input activations other than symmetric 8-bit float are not supported")
    act, kind = inputs.get("strategy"), inputs.get("dynamic")
    if kind is True and act == "token" and strategy != "block":
        return LayerQuant(QuantSpec("fp8", "token", group_k), "FP8_DYNAMIC", strategy)
    if kind is True and act == "group" and inputs.get("group_size") == GROUP and strategy == "block":
        return LayerQuant(QuantSpec("fp8", "group", group_k), "FP8_BLOCK", strategy)
    if kind is False and act == "tensor" and strategy != "block":
        return LayerQuant(QuantSpec("fp8", "static", group_k), "FP8 (static activation scales)", strategy)
    raise ConfigError(f"{where}: input activations {act!r} ({'dynamic' if kind else 'static'}) with {strategy} weight "
                      "scales are not supported (per-token dynamic, per-128-group dynamic with blocks, static "
                      "per-tensor)")


# --- msmodelslim ------------------------------------------------------------------------------------------------

_MSMODELSLIM = {"W8A8": LayerQuant(QuantSpec("int8", "static"), "W8A8", msmodelslim=True),
                "W8A8_DYNAMIC": LayerQuant(QuantSpec("int8", "token"), "W8A8_DYNAMIC", msmodelslim=True)}


def _msmodelslim(file: Path) -> QuantPlan:
    raw = read_json_object(file, "an object of tensor name -> FLOAT, W8A8 or W8A8_DYNAMIC")
    per = {}
    for name, kind in raw.items():
        if not name.endswith(".weight") or kind == "FLOAT":
            continue
        if kind not in _MSMODELSLIM:
            raise ConfigError(f"{file}: {name} is {kind!r}; only FLOAT, W8A8 and W8A8_DYNAMIC are supported")
        per[name.removesuffix(".weight")] = _MSMODELSLIM[kind]
    return QuantPlan("msmodelslim", per_tensor=per, source=str(file))
