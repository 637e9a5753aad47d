"""Tiny checkpoint variants for the tests, written by transformers' save_pretrained (testing/tiny_random.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from glm45v_npu.testing.tiny_random import (
    TEXT,
    TOKEN_IDS,
    image_processor,
    spread_init,
    write_text_checkpoint,
    write_vl_checkpoint,
)

__all__ = ["image_processor", "make_text_checkpoint", "make_vl_checkpoint", "random_image"]

IMAGE_TOKEN = TOKEN_IDS["<|image|>"]
IMAGE_START, IMAGE_END = TOKEN_IDS["<|begin_of_image|>"], TOKEN_IDS["<|end_of_image|>"]
TEXT_TOKENS = 250  # ids below this are plain bytes: safe random prompt text

# Three VL checkpoints differing in GQA ratio, head_dim, rotary fraction, experts, top-k, groups, normalisation,
# scaling and dense layers.
VL_VARIANTS = {
    "gqa2-hd32-half-rope": TEXT,
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



def make_vl_checkpoint(path: Path, variant: str = "gqa2-hd32-half-rope", seed: int = 0,
                       max_shard_size: str | None = None, **text_overrides):
    return write_vl_checkpoint(path, {**VL_VARIANTS[variant], **text_overrides}, seed, max_shard_size)


def make_text_checkpoint(path: Path, variant: str = "qk-norm", seed: int = 0, **overrides):
    return write_text_checkpoint(path, {**TEXT_VARIANTS[variant], **overrides}, seed)


def random_image(width: int, height: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


# transformers' own test configurations (tests/models/glm4v_moe and glm4_moe, CausalLMModelTester's defaults):
# tied embeddings, merge size 1, every expert chosen, vocab 99. glm4_moe's tester uses gelu, which GLM checkpoints
# never do: it is refused by name, and the same configuration with silu is compared.
HF_VL_TEST_TEXT = dict(vocab_size=99, hidden_size=16, intermediate_size=22, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, hidden_act="silu", max_position_embeddings=512,
                       rope_scaling={"type": "default", "mrope_section": [1, 1]}, rope_theta=10000,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0, n_routed_experts=8,
                       n_shared_experts=1, n_group=1, topk_group=1, num_experts_per_tok=8)
HF_VL_TEST_VISION = dict(depth=2, hidden_act="silu", hidden_size=48, out_hidden_size=16, intermediate_size=22,
                         patch_size=14, spatial_merge_size=1, temporal_patch_size=2)
HF_VL_TEST_TOKENS = dict(video_start_token_id=3, video_end_token_id=4, image_start_token_id=5, image_end_token_id=6,
                         image_token_id=7, video_token_id=8)
HF_TEXT_TEST = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=37, hidden_act="gelu", max_position_embeddings=512, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, moe_intermediate_size=12, num_experts_per_tok=8,
                    n_routed_experts=8, n_shared_experts=1, n_group=1, topk_group=1)


def make_hf_test_checkpoint(path: Path, kind: str, seed: int = 0, **overrides):
    """transformers' own test configuration for `kind` (glm4v_moe or glm4_moe), saved by save_pretrained."""
    from transformers import (
        Glm4MoeConfig,
        Glm4MoeForCausalLM,
        Glm4vMoeConfig,
        Glm4vMoeForConditionalGeneration,
    )

    torch.manual_seed(seed)
    if kind == "glm4v_moe":
        cfg = Glm4vMoeConfig(text_config={**HF_VL_TEST_TEXT, **overrides}, vision_config=HF_VL_TEST_VISION,
                             **HF_VL_TEST_TOKENS)
        model = Glm4vMoeForConditionalGeneration(cfg).eval()
    else:
        model = Glm4MoeForCausalLM(Glm4MoeConfig(**{**HF_TEXT_TEST, **overrides})).eval()
    spread_init(model, seed)
    model.save_pretrained(path)
    return model
