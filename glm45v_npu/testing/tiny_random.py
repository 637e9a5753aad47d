"""A tiny model of the GLM-4.5V architecture, written locally by transformers' own save_pretrained.

It carries a byte-level tokenizer with the GLM special tokens and GLM-4.5V's chat template, so every command
and test runs on a fresh machine with no download. Its answers are random.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>", "<think>", "</think>", "<|begin_of_box|>", "<|end_of_box|>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>",
    "</arg_value>",
]
TOKEN_IDS = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
VOCAB = 288
EOS_IDS = [TOKEN_IDS["<|endoftext|>"], TOKEN_IDS["<|user|>"], TOKEN_IDS["<|observation|>"]]

# GLM-4.5V's own chat template (tools, tool calls and results, thinking on and off, images and videos).
CHAT_TEMPLATE = (Path(__file__).parent / "glm45v_chat_template.jinja").read_text()

VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=40, image_size=56, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2)
TEXT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=80,
            partial_rotary_factor=0.5, mrope_section=[2, 3, 3], n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, first_k_dense_replace=1,
            num_hidden_layers=3, moe_intermediate_size=24, attention_bias=True)


@contextmanager
def _quiet() -> Iterator[None]:
    """No transformers progress bar ("Writing model shards") in the output of the command that made the model."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# Small frames for tests: a few frames of up to 56x56 (the real GLM-4.5V allows 28*28*2*30000 pixels in all).
VIDEO_PROCESSOR = {"video_processor_type": "Glm4vVideoProcessor", "fps": 2, "max_duration": 300,
                   "size": {"shortest_edge": 28 * 28 * 2, "longest_edge": 28 * 28 * 2 * 16}, "patch_size": 14,
                   "temporal_patch_size": 2, "merge_size": 2}


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=SPECIAL_TOKENS,
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def text_kwargs(spec: dict) -> dict:
    spec = dict(spec)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": spec.pop("partial_rotary_factor")}
    if "mrope_section" in spec:
        rope["mrope_section"] = spec.pop("mrope_section")
    return dict(vocab_size=VOCAB, rope_parameters=rope, max_position_embeddings=4096, eos_token_id=EOS_IDS,
                pad_token_id=EOS_IDS[0], **spec)


def spread_init(model: torch.nn.Module, seed: int) -> None:
    """Fan-in scaled normals, norm weights around 1, non-zero biases and router correction bias: transformers'
    default std 0.02 makes every logit nearly equal, which hides bugs and makes generation degenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p.shape[-1] if "experts" in name else p[0].numel()
                std = 1.0 if "embed_tokens" in name else 0.5 if "position_embedding" in name else fan_in**-0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            else:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def image_processor(max_pixels: int = 112 * 112):
    import transformers

    cls = getattr(transformers, "Glm4vImageProcessorPil", None) or transformers.Glm4vImageProcessor  # no torchvision
    return cls(size={"shortest_edge": 28 * 28, "longest_edge": max_pixels}, patch_size=14,
                                  temporal_patch_size=2, merge_size=2)


def write_vl_checkpoint(path: Path, text: dict | None = None, seed: int = 0, max_shard_size: str | None = None):
    """Write a tiny GLM-4.5V checkpoint with tokenizer and preprocessor config; returns the transformers model."""
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    text_cfg = text_kwargs(text or TEXT)
    cfg = Glm4vMoeConfig(
        text_config=text_cfg, vision_config=dict(VISION, out_hidden_size=text_cfg["hidden_size"]),
        image_token_id=TOKEN_IDS["<|image|>"], video_token_id=TOKEN_IDS["<|video|>"],
        image_start_token_id=TOKEN_IDS["<|begin_of_image|>"], image_end_token_id=TOKEN_IDS["<|end_of_image|>"],
        video_start_token_id=TOKEN_IDS["<|begin_of_video|>"], video_end_token_id=TOKEN_IDS["<|end_of_video|>"],
    )
    torch.manual_seed(seed)
    model = Glm4vMoeForConditionalGeneration(cfg).eval()
    spread_init(model, seed)
    with _quiet():
        model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    image_processor().save_pretrained(path)
    (path / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PROCESSOR))
    save_tokenizer(path)
    return model


def write_text_checkpoint(path: Path, text: dict, seed: int = 0):
    """Write a tiny text-only GLM-4.5 (glm4_moe) checkpoint with tokenizer; returns the transformers model."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(Glm4MoeConfig(**text_kwargs(text))).eval()
    spread_init(model, seed)
    with _quiet():
        model.save_pretrained(path)
    save_tokenizer(path)
    return model
