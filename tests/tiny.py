"""Tiny random GLM-4.5V / GLM-4.5 checkpoints written by transformers' own save_pretrained.

Weights are re-initialised with a wide spread (fan-in scaled normals, norm weights around 1, non-zero biases and
router correction bias): transformers' default std 0.02 makes every logit nearly equal and hides bugs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

IMAGE_TOKEN, IMAGE_START, IMAGE_END, VIDEO_TOKEN = 250, 251, 252, 253
VOCAB = 256

VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=40, image_size=56, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2)

# Three VL checkpoints differing in every dimension the issue names.
VL_VARIANTS = {
    "gqa2-hd32-half-rope": dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=80,
        partial_rotary_factor=0.5, mrope_section=[2, 3, 3], n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, first_k_dense_replace=1, num_hidden_layers=3,
        moe_intermediate_size=24, attention_bias=True),
    "gqa3-hd16-full-rope": dict(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16, intermediate_size=64,
        partial_rotary_factor=1.0, mrope_section=[2, 3, 3], n_routed_experts=6, num_experts_per_tok=3, n_group=3,
        topk_group=2, norm_topk_prob=False, routed_scaling_factor=2.5, first_k_dense_replace=2, num_hidden_layers=3,
        moe_intermediate_size=16, attention_bias=True),
    "gqa12-hd16-quarter-rope": dict(
        hidden_size=48, num_attention_heads=12, num_key_value_heads=1, head_dim=16, intermediate_size=56,
        partial_rotary_factor=0.25, mrope_section=[1, 1, 0], n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.5, first_k_dense_replace=0, num_hidden_layers=2,
        moe_intermediate_size=12, attention_bias=False),
}

TEXT_VARIANTS = {
    "qk-norm": dict(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16, intermediate_size=72,
        partial_rotary_factor=0.5, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.0, first_k_dense_replace=1, num_hidden_layers=3,
        moe_intermediate_size=16, attention_bias=True, use_qk_norm=True),
    "no-qk-norm": dict(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=16, intermediate_size=64,
        partial_rotary_factor=1.0, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=1, num_hidden_layers=2,
        moe_intermediate_size=16, attention_bias=False, use_qk_norm=False),
}


def _text_kwargs(v: dict) -> dict:
    v = dict(v)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": v.pop("partial_rotary_factor")}
    if "mrope_section" in v:
        rope["mrope_section"] = v.pop("mrope_section")
    return dict(vocab_size=VOCAB, rope_parameters=rope, max_position_embeddings=4096, eos_token_id=[1, 2], **v)


def spread_init(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=g) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p.shape[-1] if "experts" in name else p[0].numel()
                std = 1.0 if "embed_tokens" in name else 0.5 if "position_embedding" in name else 1 / math.sqrt(fan_in)
                p.copy_(normal(p.shape, std))
            elif name.endswith("bias"):
                p.copy_(normal(p.shape, 0.2))
            else:  # norm weights
                p.copy_(1 + normal(p.shape, 0.2))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(normal(b.shape, 0.1))


def make_vl_checkpoint(path: Path, variant: str = "gqa2-hd32-half-rope", seed: int = 0,
                       max_shard_size: str | None = None, **text_overrides):
    """Write a tiny GLM-4.5V checkpoint (with preprocessor_config.json); returns the transformers model."""
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    text = _text_kwargs({**VL_VARIANTS[variant], **text_overrides})
    vision = dict(VISION, out_hidden_size=text["hidden_size"])
    cfg = Glm4vMoeConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                         image_start_token_id=IMAGE_START, image_end_token_id=IMAGE_END, video_token_id=VIDEO_TOKEN)
    torch.manual_seed(seed)
    model = Glm4vMoeForConditionalGeneration(cfg).eval()
    spread_init(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    image_processor().save_pretrained(path)
    return model


def make_text_checkpoint(path: Path, variant: str = "qk-norm", seed: int = 0, **overrides):
    """Write a tiny text-only GLM-4.5 (glm4_moe) checkpoint; returns the transformers model."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    cfg = Glm4MoeConfig(**_text_kwargs({**TEXT_VARIANTS[variant], **overrides}))
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(cfg).eval()
    spread_init(model, seed)
    model.save_pretrained(path)
    return model


def image_processor():
    """Small pixel budget so tiny images stay a few dozen patches."""
    from transformers import Glm4vImageProcessorPil as Glm4vImageProcessor

    return Glm4vImageProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 112 * 112}, patch_size=14,
                               temporal_patch_size=2, merge_size=2)


def random_image(width: int, height: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")
