import json
import os

import pytest
import torch
from safetensors.torch import save_file

from hla import load_model
from hla.models.checkpoint import checkpoint_name_table
from hla.models.config import KimiLinearConfig
from hla.models.kimi_linear import KimiLinearForCausalLM


def _model(dtype=torch.float32, **changes):
    torch.manual_seed(0)
    return KimiLinearForCausalLM(KimiLinearConfig.preset("tiny").replace(**changes)).to_dtype(dtype)


def _assert_same_weights(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shard", [None, 200_000], ids=["one-file", "sharded"])
def test_save_load_round_trip_bit_exact(tmp_path, dtype, shard):
    model = _model(dtype)
    kwargs = {} if shard is None else {"max_shard_bytes": shard}
    model.save_pretrained(tmp_path, **kwargs)
    files = sorted(os.listdir(tmp_path))
    if shard is None:
        assert files == ["config.json", "model.safetensors"]
    else:
        shards = [f for f in files if f.startswith("model-")]
        assert len(shards) > 1 and "model.safetensors.index.json" in files
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards)
    loaded = load_model(tmp_path, dtype=dtype)
    _assert_same_weights(model, loaded)
    ids = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_tied_embeddings_round_trip(tmp_path):
    model = _model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _assert_same_weights(model, loaded)


def test_load_into_other_dtype_keeps_fp32_tensors(tmp_path):
    _model(torch.float32).save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    for name, p in loaded.named_parameters():
        want = torch.float32 if name in loaded.fp32_param_names() else torch.bfloat16
        assert p.dtype == want, name


def _release_names(cfg):
    """Tensor names of spec section 6, written out by hand (not from hla's name table)."""
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        a = p + "self_attn."
        if cfg.is_mla_layer(n):
            names += [a + s for s in ("q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight",
                                      "kv_b_proj.weight", "o_proj.weight")]
        else:
            names += [a + f"{x}_proj.weight" for x in "qkv"] + [a + f"{x}_conv1d.weight" for x in "qkv"]
            names += [a + s for s in ("f_a_proj.weight", "f_b_proj.weight", "dt_bias", "A_log", "b_proj.weight",
                                      "g_a_proj.weight", "g_b_proj.weight", "o_norm.weight", "o_proj.weight")]
        if n < cfg.first_k_dense_replace:
            names += [p + f"mlp.{x}.weight" for x in ("gate_proj", "up_proj", "down_proj")]
        else:
            m = p + "block_sparse_moe."
            names += [m + "gate.weight", m + "gate.e_score_correction_bias"]
            names += [m + f"experts.{e}.{w}.weight" for e in range(cfg.num_experts) for w in ("w1", "w2", "w3")]
            names += [m + f"shared_experts.{x}.weight" for x in ("gate_proj", "up_proj", "down_proj")]
    return names


def test_release_named_checkpoint_written_with_safetensors_loads(tmp_path):
    cfg = KimiLinearConfig.preset("tiny")
    d, I, D = cfg.hidden_size, cfg.moe_intermediate_size, cfg.kda_num_heads * cfg.kda_head_dim
    K, H, V = cfg.kda_head_dim, cfg.kda_num_heads, cfg.vocab_size
    Hm, R, dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    by_suffix = [  # most specific first
        ("embed_tokens.weight", [V, d]), ("lm_head.weight", [V, d]), ("kv_a_layernorm.weight", [R]),
        ("layernorm.weight", [d]), ("model.norm.weight", [d]), ("o_norm.weight", [K]),
        ("mlp.gate_proj.weight", [cfg.intermediate_size, d]), ("mlp.up_proj.weight", [cfg.intermediate_size, d]),
        ("mlp.down_proj.weight", [d, cfg.intermediate_size]),
        ("shared_experts.gate_proj.weight", [I, d]), ("shared_experts.up_proj.weight", [I, d]),
        ("shared_experts.down_proj.weight", [d, I]), ("w1.weight", [I, d]), ("w3.weight", [I, d]),
        ("w2.weight", [d, I]), ("gate.weight", [cfg.num_experts, d]),
        ("e_score_correction_bias", [cfg.num_experts]), ("conv1d.weight", [D, 1, 4]), ("f_a_proj.weight", [K, d]),
        ("f_b_proj.weight", [D, K]), ("dt_bias", [D]), ("A_log", [1, 1, H, 1]), ("self_attn.b_proj.weight", [H, d]),
        ("g_a_proj.weight", [K, d]), ("g_b_proj.weight", [D, K]), ("kv_a_proj_with_mqa.weight", [R + dr, d]),
        ("kv_b_proj.weight", [Hm * (cfg.qk_nope_head_dim + cfg.v_head_dim), R]),
    ]

    def shape_of(name):
        mla = cfg.is_mla_layer(int(name.split(".")[2])) if name.startswith("model.layers.") else False
        if name.endswith("self_attn.o_proj.weight"):
            return [d, Hm * cfg.v_head_dim] if mla else [d, D]
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            return [Hm * (cfg.qk_nope_head_dim + dr), d] if mla else [D, d]
        for suffix, shape in by_suffix:
            if name.endswith(suffix):
                return shape
        raise KeyError(name)

    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name in _release_names(cfg):
        keep32 = name.endswith(("A_log", "dt_bias", "gate.weight", "e_score_correction_bias")) and "mlp" not in name
        tensors[name] = (torch.randn(shape_of(name), generator=gen) * 0.05).to(
            torch.float32 if keep32 else torch.bfloat16)
    half = len(tensors) // 2
    items = list(tensors.items())
    save_file(dict(items[:half]), str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(dict(items[half:]), str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(tensors)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.replace(dtype="bfloat16").to_json(tmp_path / "config.json")

    model = load_model(tmp_path)
    assert model.dtype == torch.bfloat16
    params = dict(model.named_parameters())
    assert torch.equal(params["model.layers.2.block_sparse_moe.experts.w2"][5],
                       tensors["model.layers.2.block_sparse_moe.experts.5.w2.weight"])
    assert torch.equal(params["model.layers.0.self_attn.A_log"], tensors["model.layers.0.self_attn.A_log"])
    assert params["model.layers.0.self_attn.A_log"].dtype == torch.float32
    assert torch.isfinite(model(torch.randint(0, 512, (1, 5))).logits.float()).all()
    assert set(checkpoint_name_table(model)) == set(tensors)


def _corrupt(tmp_path, edit):
    _model().save_pretrained(tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))


def test_load_errors_name_the_tensor(tmp_path):
    name = "model.layers.1.self_attn.f_b_proj.weight"
    _corrupt(tmp_path / "a", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"missing 1 tensors: model\.layers\.1\.self_attn\.f_b_proj\.weight "
                                         r"\(expected \[32, 16\]\)"):
        load_model(tmp_path / "a")

    def reshape(t):
        t[name] = torch.zeros(32, 8)
    _corrupt(tmp_path / "b", reshape)
    with pytest.raises(ValueError, match=r"f_b_proj\.weight: expected \[32, 16\], found \[32, 8\]"):
        load_model(tmp_path / "b")

    def extra(t):
        t["model.layers.1.self_attn.rotary.inv_freq"] = torch.zeros(4)
    _corrupt(tmp_path / "c", extra)
    with pytest.raises(ValueError, match=r"unexpected 1 tensors: model\.layers\.1\.self_attn\.rotary\.inv_freq \[4\]"):
        load_model(tmp_path / "c")
    assert load_model(tmp_path / "c", strict=False) is not None


def test_pickle_checkpoints_are_refused(tmp_path):
    KimiLinearConfig.preset("tiny").to_json(tmp_path / "config.json")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="pickle"):
        load_model(tmp_path / "pytorch_model.bin")


def test_load_peak_memory_near_one_copy(tmp_path):
    # Peak RSS while loading must stay near one copy of the weights (meta build + in-place fill,
    # copies straight from mmap views), measured in a fresh process; ~184 MB of fp32 weights.
    # Materialising a state dict and then a model would need about twice that.
    import subprocess
    import sys

    cfg = KimiLinearConfig.preset("small").replace(vocab_size=8192, hidden_size=384, intermediate_size=1024,
                                                   moe_intermediate_size=256)
    model = KimiLinearForCausalLM(cfg)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path, max_shard_bytes=40 * 2**20)
    del model
    # VmHWM is the peak RSS of this process image (ru_maxrss would carry the parent's over exec).
    code = (
        "import re, sys, torch, hla\n"
        "kb = lambda k: int(re.search(k + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        # A first meta build pulls in torch's lazily imported decompositions (~140 MB, paid once).
        "with torch.device('meta'):\n"
        "    hla.KimiLinearForCausalLM(hla.KimiLinearConfig.from_json(sys.argv[1]))\n"
        "before = kb('VmRSS')\n"
        "m = hla.load_model(sys.argv[1], dtype=torch.float32)\n"
        "print((kb('VmHWM') - before) * 1024)\n"
    )
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         check=True, timeout=300)
    peak = int(out.stdout.strip().splitlines()[-1])
    # Allowance beyond the weights: at most one tensor's mapped file pages plus allocator slack.
    assert peak < weights + largest + 20e6, f"peak {peak / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"
