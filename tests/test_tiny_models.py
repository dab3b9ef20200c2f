"""The catalog's parameter arithmetic against real transformers modules of each
R1 architecture, built as tiny random models (the conftest fixture)."""

import json

import pytest

from dsr1.catalog import ModelSpec


def spec_from_config(cfg: dict) -> ModelSpec:
    arch = cfg["model_type"]
    common = dict(name="tiny", repo="local/tiny", description="", architecture=arch, params_b=0.0,
                  layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                  heads=cfg["num_attention_heads"], kv_heads=cfg["num_key_value_heads"], vocab=cfg["vocab_size"],
                  max_context=cfg["max_position_embeddings"], native_dtype="fp32", hub_size_gb=0.0, licence="",
                  reasoning=False, tie_embeddings=cfg.get("tie_word_embeddings", False),
                  attention_bias=arch == "qwen2", head_dim=cfg.get("head_dim"))
    if arch == "deepseek_v3":
        common.update(moe_intermediate=cfg["moe_intermediate_size"], routed_experts=cfg["n_routed_experts"],
                      shared_experts=cfg["n_shared_experts"], experts_per_token=cfg["num_experts_per_tok"],
                      first_dense_layers=cfg["first_k_dense_replace"], q_lora_rank=cfg["q_lora_rank"],
                      kv_lora_rank=cfg["kv_lora_rank"], qk_nope_head_dim=cfg["qk_nope_head_dim"],
                      qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"])
    return ModelSpec(**common)


@pytest.mark.parametrize("kind", ["qwen2", "llama", "deepseek_v3"])
def test_param_count_matches_real_module(kind, tiny_model_factory):
    import torch
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory(kind)
    cfg = json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    real = sum(p.numel() for p in model.parameters())
    spec = spec_from_config(cfg)
    # DeepseekV3 routers also carry a per-expert score-correction bias (a buffer
    # or parameter depending on the version): a handful of values per layer.
    assert spec.total_params() == pytest.approx(real, rel=0.002)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
