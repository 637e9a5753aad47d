"""config.json parsing: both rope spellings, transformers' defaults, clear errors."""

import json

import pytest

from glm45v_npu.errors import ConfigError
from glm45v_npu.model.hf_config import builtin_config, load_config, parse_config


def _real():
    return json.loads(builtin_config("glm-4.5v").read_text())


def test_builtin_glm45v_config_matches_model_facts():
    cfg = load_config(builtin_config("glm-4.5v"))
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (
        4096, 46, 96, 8, 128)
    assert (t.rotary_dim, t.mrope_section, t.rope_theta, t.use_qk_norm, t.attention_bias) == (
        64, (8, 12, 12), 10000.0, False, True)
    assert (t.n_routed_experts, t.num_experts_per_tok, t.n_shared_experts, t.first_k_dense_replace) == (128, 8, 1, 1)
    assert t.eos_token_ids == (151329, 151336, 151338)
    assert (v.depth, v.hidden_size, v.num_heads, v.out_hidden_size, v.intermediate_size) == (24, 1536, 12, 4096, 10944)
    assert cfg.image_token_id == 151363


def test_rope_parameters_and_rope_scaling_agree():
    old = _real()
    new = _real()
    t = new["text_config"]
    t["rope_parameters"] = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.5}
    for key in ("rope_scaling", "rope_theta", "partial_rotary_factor"):
        t.pop(key)
    assert parse_config(old).text == parse_config(new).text


def test_absent_fields_take_transformers_defaults():
    from transformers import Glm4MoeConfig, Glm4vMoeConfig

    # head_dim given: transformers' bare default (4096 / 96 = 42.67) gives an odd rotary dim we reject
    ours = parse_config({"model_type": "glm4v_moe", "text_config": {"head_dim": 128}})
    theirs = Glm4vMoeConfig(text_config={"head_dim": 128})
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts", "max_position_embeddings",
                  "attention_bias", "first_k_dense_replace", "moe_intermediate_size"):
        assert getattr(ours.text, field) == getattr(theirs.text_config, field), field
    assert ours.text.partial_rotary_factor == 0.5 and ours.text.use_qk_norm is False
    assert ours.vision.intermediate_size == theirs.vision_config.intermediate_size
    text = parse_config({"model_type": "glm4_moe", "head_dim": 128})
    ref = Glm4MoeConfig(head_dim=128)
    assert (text.text.vocab_size, text.text.attention_bias, text.text.max_position_embeddings) == (
        ref.vocab_size, ref.attention_bias, ref.max_position_embeddings)
    assert text.vision is None and text.text.mrope_section is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="llama"), "model_type 'llama' is not supported"),
        (lambda c: c["text_config"].update(num_key_value_heads=7), "num_key_value_heads"),
        (lambda c: c["text_config"].update(hidden_size="4096"), "'hidden_size' must be an integer"),
        (lambda c: c["text_config"]["rope_scaling"].update(mrope_section=[8, 8, 8]), "mrope_section"),
        (lambda c: c["text_config"].update(topk_group=2), "topk_group"),
        (lambda c: c["text_config"].update(num_experts_per_tok=200), "num_experts_per_tok"),
        (lambda c: c["text_config"]["rope_scaling"].update(rope_type="yarn"), "rope_type 'yarn'"),
        (lambda c: c["vision_config"].update(out_hidden_size=1024), "out_hidden_size"),
        (lambda c: c["vision_config"].update(num_heads=7), "num_heads"),
    ],
)
def test_bad_config_names_field_and_file(tmp_path, edit, message):
    raw = _real()
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert message in str(err.value)
    assert str(tmp_path / "config.json") in str(err.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: no such file"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
