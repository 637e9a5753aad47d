"""Checkpoint config.json -> frozen dataclasses.

Field names follow transformers' `Glm4vMoeConfig` / `Glm4MoeConfig`; absent fields take transformers' defaults,
so a config that transformers accepts means the same thing here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..parallel.layout import Layout

SUPPORTED_MODEL_TYPES = ("glm4v_moe", "glm4_moe")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool
    use_qk_norm: bool
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: tuple[int, ...] | None
    max_position_embeddings: int
    first_k_dense_replace: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    hidden_act: str
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and self.n_routed_experts > 0


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    image_size: int
    out_hidden_size: int
    intermediate_size: int
    rms_norm_eps: float
    attention_bias: bool
    rope_theta: float
    hidden_act: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig | None
    image_token_id: int | None
    image_start_token_id: int | None
    image_end_token_id: int | None
    video_token_id: int | None
    video_start_token_id: int | None
    video_end_token_id: int | None
    torch_dtype: str | None
    source: str

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None


# transformers' defaults, per text config class (they differ between the VL and the text-only model).
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "glm4v_moe": dict(vocab_size=151424, attention_bias=True, max_position_embeddings=65536),
    "glm4_moe": dict(vocab_size=151552, attention_bias=False, max_position_embeddings=131072),
}
_COMMON_TEXT_DEFAULTS: dict[str, Any] = dict(
    hidden_size=4096,
    intermediate_size=10944,
    num_hidden_layers=46,
    num_attention_heads=96,
    num_key_value_heads=8,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    moe_intermediate_size=1408,
    num_experts_per_tok=8,
    n_shared_experts=1,
    n_routed_experts=128,
    routed_scaling_factor=1.0,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    use_qk_norm=False,
)
_VISION_DEFAULTS: dict[str, Any] = dict(
    depth=24,
    hidden_size=1536,
    hidden_act="silu",
    attention_bias=False,
    num_heads=12,
    in_channels=3,
    image_size=336,
    patch_size=14,
    rms_norm_eps=1e-5,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=4096,
    intermediate_size=13696,
)
_TOKEN_DEFAULTS = dict(image_token_id=151363, image_start_token_id=151339, image_end_token_id=151340,
                       video_token_id=151364, video_start_token_id=151341, video_end_token_id=151342)


class _Fields:
    """Typed access to one JSON object; every error names the file and the field."""

    def __init__(self, raw: dict[str, Any], where: str, defaults: dict[str, Any]):
        self.raw, self.where, self.defaults = raw, where, defaults

    def _get(self, name: str) -> Any:
        value = self.raw.get(name)
        return self.defaults.get(name) if value is None else value

    def int(self, name: str, minimum: int = 1) -> int:
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.where}: field '{name}' must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{self.where}: field '{name}' must be >= {minimum}, got {value}")
        return value

    def float(self, name: str, value: Any = None) -> float:
        value = self._get(name) if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.where}: field '{name}' must be a number, got {value!r}")
        return float(value)

    def bool(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}: field '{name}' must be true or false, got {value!r}")
        return value

    def str(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise ConfigError(f"{self.where}: field '{name}' must be a string, got {value!r}")
        return value


def _rope_dict(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Newer configs call it rope_parameters, older ones rope_scaling; either may be absent."""
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}: field 'rope_parameters' must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{where}: rope_type '{rope_type}' is not supported (only 'default' M-RoPE)")
    return rope


def _eos_ids(*candidates: Any) -> tuple[int, ...]:
    for value in candidates:
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        return tuple(int(i) for i in ids)
    return ()


def _text_config(raw: dict[str, Any], model_type: str, where: str, top: dict[str, Any]) -> TextConfig:
    f = _Fields(raw, where, {**_COMMON_TEXT_DEFAULTS, **_TEXT_DEFAULTS[model_type]})
    rope = _rope_dict(raw, where)
    hidden, heads = f.int("hidden_size"), f.int("num_attention_heads")
    head_dim = raw.get("head_dim") or hidden // heads
    mrope = rope.get("mrope_section", [8, 12, 12] if model_type == "glm4v_moe" else None)
    cfg = TextConfig(
        vocab_size=f.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.int("intermediate_size"),
        num_hidden_layers=f.int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=f.int("num_key_value_heads"),
        head_dim=int(head_dim),
        attention_bias=f.bool("attention_bias"),
        use_qk_norm=f.bool("use_qk_norm"),
        rms_norm_eps=f.float("rms_norm_eps"),
        rope_theta=f.float("rope_theta", rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
        partial_rotary_factor=f.float(
            "partial_rotary_factor", rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))
        ),
        mrope_section=tuple(int(s) for s in mrope) if mrope is not None else None,
        max_position_embeddings=f.int("max_position_embeddings"),
        first_k_dense_replace=f.int("first_k_dense_replace", minimum=0),
        n_routed_experts=f.int("n_routed_experts"),
        num_experts_per_tok=f.int("num_experts_per_tok"),
        moe_intermediate_size=f.int("moe_intermediate_size"),
        n_shared_experts=f.int("n_shared_experts", minimum=0),
        n_group=f.int("n_group"),
        topk_group=f.int("topk_group"),
        norm_topk_prob=f.bool("norm_topk_prob"),
        routed_scaling_factor=f.float("routed_scaling_factor"),
        hidden_act=f.str("hidden_act"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", top.get("tie_word_embeddings", False))),
        eos_token_ids=_eos_ids(raw.get("eos_token_id"), top.get("eos_token_id")),
    )
    _check_text(cfg, where)
    return cfg


def _check_text(c: TextConfig, where: str) -> None:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    if c.num_attention_heads % c.num_key_value_heads:
        raise bad(
            f"num_attention_heads ({c.num_attention_heads}) is not a multiple of "
            f"num_key_value_heads ({c.num_key_value_heads})"
        )
    if c.hidden_act != "silu":
        raise bad(f"hidden_act '{c.hidden_act}' is not supported (only 'silu')")
    if not 0 < c.partial_rotary_factor <= 1 or c.rotary_dim % 2:
        raise bad(
            f"partial_rotary_factor {c.partial_rotary_factor} with head_dim {c.head_dim} "
            f"gives rotary dim {c.rotary_dim}; it must be even and in (0, head_dim]"
        )
    if c.mrope_section is not None and 2 * sum(c.mrope_section) != c.rotary_dim:
        raise bad(
            f"mrope_section {list(c.mrope_section)} sums to {sum(c.mrope_section)}, "
            f"but the rotary dim {c.rotary_dim} needs {c.rotary_dim // 2}"
        )
    if c.n_routed_experts % c.n_group:
        raise bad(f"n_routed_experts ({c.n_routed_experts}) is not a multiple of n_group ({c.n_group})")
    if c.topk_group > c.n_group:
        raise bad(f"topk_group ({c.topk_group}) exceeds n_group ({c.n_group})")
    per_group = c.n_routed_experts // c.n_group
    if c.n_group > 1 and per_group < 2:
        raise bad(f"group-limited routing needs >= 2 experts per group, got {per_group}")
    if c.num_experts_per_tok > per_group * c.topk_group:
        raise bad(
            f"num_experts_per_tok ({c.num_experts_per_tok}) exceeds the experts in topk_group groups "
            f"({per_group * c.topk_group})"
        )
    if c.first_k_dense_replace > c.num_hidden_layers:
        raise bad(
            f"first_k_dense_replace ({c.first_k_dense_replace}) exceeds num_hidden_layers ({c.num_hidden_layers})"
        )


def _vision_config(raw: dict[str, Any], where: str, text: TextConfig) -> VisionConfig:
    f = _Fields(raw, where, _VISION_DEFAULTS)
    rope = raw.get("rope_parameters") or {}
    cfg = VisionConfig(
        depth=f.int("depth"),
        hidden_size=f.int("hidden_size"),
        num_heads=f.int("num_heads"),
        in_channels=f.int("in_channels"),
        patch_size=f.int("patch_size"),
        temporal_patch_size=f.int("temporal_patch_size"),
        spatial_merge_size=f.int("spatial_merge_size"),
        image_size=f.int("image_size"),
        out_hidden_size=f.int("out_hidden_size"),
        intermediate_size=f.int("intermediate_size"),
        rms_norm_eps=f.float("rms_norm_eps"),
        attention_bias=f.bool("attention_bias"),
        rope_theta=f.float("rope_theta", rope.get("rope_theta", 10000.0)),
        hidden_act=f.str("hidden_act"),
    )
    if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
        raise ConfigError(
            f"{where}: hidden_size ({cfg.hidden_size}) / num_heads ({cfg.num_heads}) must give a head_dim "
            "divisible by 4 (2D rotary over h and w)"
        )
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"{where}: image_size ({cfg.image_size}) is not a multiple of patch_size ({cfg.patch_size})")
    if cfg.out_hidden_size != text.hidden_size:
        raise ConfigError(
            f"{where}: out_hidden_size ({cfg.out_hidden_size}) must equal text hidden_size ({text.hidden_size})"
        )
    if cfg.hidden_act != "silu":
        raise ConfigError(f"{where}: hidden_act '{cfg.hidden_act}' is not supported (only 'silu')")
    return cfg


def parse_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from an already-loaded config.json object; `source` names it in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "glm4v_moe":
        text_raw = raw.get("text_config") or {}
        vision_raw = raw.get("vision_config") or {}
        if not isinstance(text_raw, dict) or not isinstance(vision_raw, dict):
            raise ConfigError(f"{source}: text_config and vision_config must be objects")
        text = _text_config(text_raw, model_type, f"{source} (text_config)", raw)
        vision = _vision_config(vision_raw, f"{source} (vision_config)", text)
        tokens = {k: int(raw.get(k) or text_raw.get(k) or v) for k, v in _TOKEN_DEFAULTS.items()}
    else:
        text = _text_config(raw, model_type, source, raw)
        vision = None
        tokens = {k: None for k in _TOKEN_DEFAULTS}
    dtype = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("text_config") or {}).get("torch_dtype")
    return ModelConfig(
        model_type=model_type, text=text, vision=vision, torch_dtype=dtype, source=source, **tokens
    )


def load_config(path: str | Path) -> ModelConfig:
    """Read `<checkpoint>/config.json` (or a config file path)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: no such file (a checkpoint folder must contain config.json)")
    return parse_config(read_json_object(file), str(file))


def read_json_object(file: Path, what: str = "a JSON object") -> dict[str, Any]:
    """A checkpoint's JSON file that must hold an object; an unreadable or malformed one is an error naming it."""
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected {what}")
    return raw


def with_num_layers(cfg: ModelConfig, num_layers: int | None) -> ModelConfig:
    """The first num_layers decoder layers only (benchmarks of real shapes on a small device)."""
    if num_layers is None:
        return cfg
    if not 1 <= num_layers <= cfg.text.num_hidden_layers:
        raise ConfigError(f"--num-layers {num_layers}: expected 1..{cfg.text.num_hidden_layers} ({cfg.source})")
    text = replace(cfg.text, num_hidden_layers=num_layers,
                   first_k_dense_replace=min(cfg.text.first_k_dense_replace, num_layers))
    return replace(cfg, text=text)


BUILTIN_DIR = Path(__file__).parent / "configs"


def builtin_config(name: str) -> Path | None:
    """Configs shipped in the package (e.g. 'glm-4.5v'), usable with dummy weights and no download."""
    path = BUILTIN_DIR / name / "config.json"
    return path if path.is_file() else None


def check_layout(cfg: ModelConfig, layout: Layout) -> None:
    """A clear error, before anything is built or started, when the model does not split over layout.world ranks."""
    t, src = cfg.text, cfg.source
    layout.even(t.num_attention_heads, "num_attention_heads", src)
    layout.kv_heads(t.num_key_value_heads, src)
    layout.even(t.intermediate_size, "intermediate_size", src)
    layout.even(t.moe_intermediate_size * t.n_shared_experts, "shared expert intermediate size", src)
    if layout.expert_parallel:
        layout.even(t.n_routed_experts, "n_routed_experts", src)
    else:
        layout.even(t.moe_intermediate_size, "moe_intermediate_size", src)
