"""Quantized checkpoints made on the fly by the tools that make the published ones: llm-compressor's
`model_free_ptq` (compressed-tensors FP8, as GLM-4.5V-FP8 was made) and msmodelslim's Calibrator (Ascend W8A8),
and transformers + compressed-tensors as the reference for FP8."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

# the official FP8 release's ignore list: lm_head, routers, vision tower, embeddings stay float
IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*visual.*", "re:.*embed_tokens.*"]
CHECKPOINT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json")


def fp8_folder(src: Path, dst: Path, scheme="FP8_DYNAMIC") -> Path:
    """src's checkpoint quantized by llm-compressor (a preset name, or a compressed-tensors QuantizationScheme)."""
    from llmcompressor import model_free_ptq

    model_free_ptq(str(src), str(dst), scheme=scheme, ignore=IGNORE)
    return dst


def weight_only_fp8():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="float",
                                                                           strategy="channel", symmetric=True))


def msmodelslim_folder(model, src: Path, dst: Path, dynamic: bool, per_channel: bool = True) -> Path:
    """The transformers model `model` (written at src) quantized by msmodelslim's own Calibrator on the CPU:
    W8A8 (static, calibrated on random tokens) or W8A8_DYNAMIC. msmodelslim quantizes nn.Linear layers only, and
    transformers 5 stacks the experts into one tensor per layer, which it leaves float in that stacked form; those
    are written here per expert in msmodelslim's documented W8A8_DYNAMIC layout (int8 weight, per-channel
    weight_scale, zero weight_offset), the form its output takes for models whose experts are Linear layers."""
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig
    from safetensors.torch import load_file, save_file

    cfg = QuantConfig(w_bit=8, a_bit=8, dev_type="cpu", act_method=1, disable_names=["lm_head"], is_dynamic=dynamic,
                      disable_last_linear=False, mm_tensor=not per_channel)
    g = torch.Generator().manual_seed(0)
    calib = None if dynamic else [[torch.randint(0, 250, (1, 24), generator=g)] for _ in range(4)]
    with _inside(dst.parent / f"{dst.name}-calibration"):  # it writes features.npy to the working folder
        calibrator = Calibrator(model, cfg, calib_data=calib, disable_level="L0")
        calibrator.run()
        calibrator.save(str(dst), save_type=["safe_tensor"])
    description_file, = dst.glob("quant_model_description*.json")
    weights_file, = dst.glob("quant_model_weight*.safetensors")
    description, tensors = json.loads(description_file.read_text()), load_file(weights_file)
    for name in [n for n in tensors if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        stacked = tensors.pop(name).float()
        description.pop(name, None)
        base = name.rpartition(".")[0]
        for e, w in enumerate(stacked):
            parts = [("down_proj", w)] if name.endswith("down_proj") else list(zip(("gate_proj", "up_proj"),
                                                                                  w.chunk(2)))
            for part, weight in parts:
                scale = weight.abs().amax(-1, keepdim=True) / 127
                key = f"{base}.{e}.{part}"
                tensors[f"{key}.weight"] = torch.round(weight / scale).clamp(-128, 127).to(torch.int8)
                tensors[f"{key}.weight_scale"] = scale
                tensors[f"{key}.weight_offset"] = torch.zeros_like(scale)
                for leaf in ("weight", "weight_scale", "weight_offset"):
                    description[f"{key}.{leaf}"] = "W8A8_DYNAMIC"
    source = {}
    for file in src.glob("*.safetensors"):
        source.update(load_file(file))
    for name, tensor in source.items():  # buffers msmodelslim did not save (the routers' correction bias)
        if name not in tensors and not any(name.startswith(k.rpartition(".")[0] + ".") for k in tensors
                                           if k.endswith(".weight") and ".experts." in name):
            tensors[name], description[name] = tensor, "FLOAT"
    save_file(tensors, str(weights_file))
    description_file.write_text(json.dumps(description, indent=1))
    for file in CHECKPOINT_FILES:
        if (src / file).is_file():
            shutil.copy(src / file, dst / file)
    return dst


@contextmanager
def _inside(folder: Path):
    """Run in a fresh folder of the test's own: msmodelslim's Calibrator saves its calibration features as
    ./features.npy and refuses to reuse one that others may read, so a run in the checkout left a file there that
    failed the next run (CI's checkout makes it readable)."""
    folder.mkdir(parents=True)
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def faithful_reference(path: Path):
    """transformers + compressed-tensors on an FP8 folder, float32: every Linear decompressed and its input
    quantized per token by compressed-tensors. transformers (5.17) holds the stacked MoE experts dequantized in
    bfloat16 and runs them without activation quantization; here their weights are set back to the exact
    dequantized float32 values and each expert matmul's input goes through compressed-tensors' own dynamic
    per-token fake quantization, so that the reference runs the checkpoint's scheme everywhere."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
    from safetensors.torch import load_file
    from transformers import (
        AutoConfig,
        CompressedTensorsConfig,
        Glm4MoeForCausalLM,
        Glm4vMoeForConditionalGeneration,
    )

    config = AutoConfig.from_pretrained(path)
    cls = Glm4vMoeForConditionalGeneration if config.model_type == "glm4v_moe" else Glm4MoeForCausalLM
    ref = cls.from_pretrained(path, dtype=torch.float32, experts_implementation="eager",
                              quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    group = next(iter(config.quantization_config["config_groups"].values()))
    from compressed_tensors.quantization import QuantizationArgs

    act = QuantizationArgs.model_validate(group["input_activations"]) if group.get("input_activations") else None
    tensors = {}
    for file in path.glob("*.safetensors"):
        tensors.update(load_file(file))
    for name, module in ref.named_modules():
        if type(module).__name__ not in ("Glm4vMoeTextExperts", "Glm4MoeExperts"):
            continue
        deq = lambda k: tensors[f"{k}.weight"].float() * tensors[f"{k}.weight_scale"].float()  # noqa: E731
        E = module.gate_up_proj.shape[0]
        with torch.no_grad():
            module.gate_up_proj.data = torch.stack([torch.cat([deq(f"{name}.{e}.gate_proj"), deq(f"{name}.{e}.up_proj")])
                                                    for e in range(E)])
            module.down_proj.data = torch.stack([deq(f"{name}.{e}.down_proj") for e in range(E)])
        if act is not None:
            module.forward = _quantizing_inputs(module.forward, act, fake_quantize, compute_dynamic_scales_and_zp)
    return ref


def _quantizing_inputs(forward, args, fake_quantize, scales_of):
    """The experts' forward with every matmul input fake-quantized per token (3D, as compressed-tensors reads it)."""
    import torch.nn.functional as F

    real_linear = F.linear

    def linear(x, w, b=None):
        value = x[None] if x.dim() == 2 else x
        scale, zero = scales_of(value=value, args=args, module=None)
        return real_linear(fake_quantize(value, scale, zero, args).reshape(x.shape), w, b)

    def wrapped(*a, **kw):
        F.linear = linear
        try:
            return forward(*a, **kw)
        finally:
            F.linear = real_linear

    return wrapped
