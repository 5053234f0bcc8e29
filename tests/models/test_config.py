import json

import pytest
import torch

from hla.models.config import KimiLinearConfig
from hla.models.kimi_linear import KimiLinearForCausalLM

# The released Kimi-Linear-48B-A3B config.json fields (spec section 5).
RELEASE_48B = {
    "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "dtype": "bfloat16",
    "vocab_size": 163840, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 27,
    "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 72, "hidden_act": "silu",
    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "mla_use_nope": True, "rope_theta": 10000.0, "rope_scaling": None, "rms_norm_eps": 1e-05,
    "linear_attn_config": {
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
        "head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4,
    },
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "moe_intermediate_size": 1024, "num_experts": 256,
    "num_experts_per_token": 8, "num_shared_experts": 1, "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid", "num_expert_group": 1, "topk_group": 1, "use_grouped_topk": True,
    "routed_scaling_factor": 2.446, "num_nextn_predict_layers": 0, "tie_word_embeddings": False,
    "bos_token_id": 163584, "eos_token_id": 163586, "pad_token_id": 163839, "model_max_length": 1048576,
    "initializer_range": 0.02, "use_cache": True,
    "auto_map": {"AutoConfig": "configuration_kimi.KimiLinearConfig"},  # unknown to hla: kept as is
}


def test_release_config_round_trip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASE_48B))
    cfg = KimiLinearConfig.from_json(tmp_path)
    assert cfg == KimiLinearConfig.preset("kimi-linear-48b").replace(extra={"auto_map": RELEASE_48B["auto_map"]})
    out = cfg.to_dict()
    for key, value in RELEASE_48B.items():
        assert out[key] == value, key
    cfg.to_json(tmp_path / "again.json")
    assert KimiLinearConfig.from_json(tmp_path / "again.json") == cfg


def test_48b_preset_on_meta_device():
    cfg = KimiLinearConfig.preset("kimi-linear-48b")
    assert cfg.num_kda_layers == 20 and cfg.num_mla_layers == 7
    assert cfg.mla_layers == [3, 7, 11, 15, 19, 23, 26]
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    n = model.num_parameters()
    assert 49.0e9 < n < 49.2e9
    assert n == cfg.parameter_counts()["total"]
    assert 2.9e9 < cfg.parameter_counts()["active"] < 3.6e9


@pytest.mark.parametrize("name", ["tiny", "small", "1b"])
def test_presets_build_and_count(name):
    cfg = KimiLinearConfig.preset(name)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    assert model.num_parameters() == cfg.parameter_counts()["total"]
    if name == "tiny":
        assert model.num_parameters() < 2_000_000


def test_schedules():
    cfg = KimiLinearConfig.preset("kimi-linear-48b")
    assert cfg.with_schedule("3:1").linear_attn_config == cfg.linear_attn_config
    assert cfg.with_schedule("all_mla").num_mla_layers == 27
    assert cfg.with_schedule("all_kda").num_mla_layers == 0
    every2 = cfg.with_schedule("mla_every:2")
    assert every2.mla_layers == list(range(1, 27, 2)) + [26]
    assert every2.schedule_string().startswith("KMKM")
    assert cfg.mla_layers == [3, 7, 11, 15, 19, 23, 26]  # the original is unchanged
    with pytest.raises(ValueError, match="schedule"):
        cfg.with_schedule("5:2")
    with pytest.raises(ValueError, match="positive int"):
        cfg.with_schedule("mla_every:0")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"linear_attn_config": {**RELEASE_48B["linear_attn_config"], "kda_layers": [1, 2, 3]}}, "in neither"),
        ({"linear_attn_config": {**RELEASE_48B["linear_attn_config"], "full_attn_layers": [4, 8, 12, 16, 20, 24,
                                                                                          27, 1]}}, "both"),
        ({"linear_attn_config": {**RELEASE_48B["linear_attn_config"], "full_attn_layers": [0, 28]}}, "1-based"),
        ({"num_experts_per_token": 300}, "num_experts_per_token"),
        ({"q_lora_rank": 64}, "q_lora_rank"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"kda_lower_bound": 1.0}, "kda_lower_bound"),
    ],
    ids=["missing-layer", "both-lists", "zero-based", "topk", "q_lora", "act", "lower_bound"],
)
def test_config_validation_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        KimiLinearConfig.preset("kimi-linear-48b").replace(**changes)
