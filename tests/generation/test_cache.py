import pytest
import torch

import hla.layers.mla as mla_mod
from hla.generation.cache import HybridCache, predict_cache_bytes
from hla.models.config import KimiLinearConfig
from hla.models.kimi_linear import KimiLinearForCausalLM

MAX_ERR = 1e-10  # float64 throughout: cache paths must agree to rounding


def _model(**changes):
    cfg = KimiLinearConfig.preset("tiny").replace(**changes)
    return KimiLinearForCausalLM(cfg).to_dtype(torch.float64).eval()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=["expanded", "absorbed"])
def mla_path(request, monkeypatch):
    # Force every cached MLA call down one path, so both are checked against the full forward.
    monkeypatch.setattr(mla_mod, "ABSORB_MAX_TOKENS", 0 if request.param == "expanded" else 10**6)
    return request.param


@pytest.mark.parametrize("split", [(1, 6), (5, 9), (8, 8), (11, 11)], ids=lambda s: f"{s[0]}-{s[1]}")
@torch.no_grad()
def test_forward_cache_prefill_prefill_decode_equals_full(split, mla_path):
    # full forward == prefill(prefix) + prefill(rest, continuing state) + token-by-token decode
    model = _model()
    ids = torch.randint(0, 512, (2, 14))
    full = model(ids).logits
    a, b = split
    cache = HybridCache.allocate(model.config, 2, 16, dtype=torch.float64)
    parts = [model(ids[:, :a], cache=cache).logits]
    if b > a:
        parts.append(model(ids[:, a:b], cache=cache).logits)
    for t in range(b, 14):
        parts.append(model(ids[:, t:t + 1], cache=cache).logits)
    assert _rel(torch.cat(parts, 1), full) < MAX_ERR
    assert cache.lengths.tolist() == [14, 14]


@torch.no_grad()
def test_forward_cache_with_mla_output_gate():
    model = _model(mla_use_output_gate=True)
    ids = torch.randint(0, 512, (1, 9))
    cache = HybridCache.allocate(model.config, 1, 9, dtype=torch.float64)
    out = torch.cat([model(ids[:, :4], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                                 for t in range(4, 9)], 1)
    assert _rel(out, model(ids).logits) < MAX_ERR


@torch.no_grad()
def test_stack_rows_of_different_lengths_equal_each_row_alone(mla_path):
    model = _model()
    cfg = model.config
    prompts = [torch.randint(0, 512, (1, n)) for n in (7, 3, 5)]
    caches = []
    for p in prompts:
        c = HybridCache.allocate(cfg, 1, 12, dtype=torch.float64)
        model(p, cache=c)
        caches.append(c)
    stacked = HybridCache.stack(caches, max_length=16)
    # Poison every slot beyond each row's length: masking must keep it out of the result.
    for layer in stacked.mla.values():
        for r, p in enumerate(prompts):
            layer.latent[r, p.shape[1]:] = 1e4
            layer.k_pe[r, p.shape[1]:] = -1e4
    assert stacked.lengths.tolist() == [7, 3, 5]
    new = torch.randint(0, 512, (3, 4))
    got = [model(new[:, :2], cache=stacked).logits]  # a multi-token continuation on ragged rows
    got += [model(new[:, t:t + 1], cache=stacked).logits for t in (2, 3)]
    got = torch.cat(got, 1)
    for r, p in enumerate(prompts):
        alone = model(torch.cat([p, new[r:r + 1]], 1)).logits[:, -4:]
        assert _rel(got[r:r + 1], alone) < MAX_ERR, f"row {r}"


@torch.no_grad()
def test_select_keeps_rows():
    model = _model()
    ids = torch.randint(0, 512, (3, 6))
    cache = HybridCache.allocate(model.config, 3, 8, dtype=torch.float64)
    model(ids[:, :5], cache=cache)
    sub = cache.select([2, 0])
    out = model(ids[[2, 0], 5:6], cache=sub).logits[:, 0]
    assert _rel(out, model(ids[[2, 0]]).logits[:, -1]) < MAX_ERR


@torch.no_grad()
def test_cache_max_length_error():
    model = _model()
    cache = HybridCache.allocate(model.config, 1, 6, dtype=torch.float64)
    model(torch.randint(0, 512, (1, 5)), cache=cache)
    model(torch.randint(0, 512, (1, 1)), cache=cache)
    with pytest.raises(ValueError, match="max_length 6"):
        model(torch.randint(0, 512, (1, 1)), cache=cache)
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.randint(0, 512, (2, 1)), cache=HybridCache.allocate(model.config, 1, 6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cache_nbytes_matches_prediction(dtype):
    cfg = KimiLinearConfig.preset("tiny")
    cache = HybridCache.allocate(cfg, 3, 40, dtype=dtype)
    assert cache.nbytes() == predict_cache_bytes(cfg, 3, 40, dtype)["total"]
    assert cache.kda[0].state.dtype == torch.float32
    big = KimiLinearConfig.preset("kimi-linear-48b")
    meta = HybridCache.allocate(big, 2, 4096, device="meta", dtype=dtype)
    assert meta.nbytes() == predict_cache_bytes(big, 2, 4096, dtype)["total"]


def test_predict_cache_bytes_48b_at_1m():
    cfg = KimiLinearConfig.preset("kimi-linear-48b")
    hybrid = predict_cache_bytes(cfg, 1, 2**20)
    all_mla = predict_cache_bytes(cfg.with_schedule("all_mla"), 1, 2**20)
    assert hybrid["mla_latent"] == 7 * 2**20 * 576 * 2  # 7 MLA layers x 576 bf16 values per token
    assert 39 * 2**20 < hybrid["kda_state"] <= 41 * 2**20  # 20 layers x 32 x 128 x 128 fp32 = 40 MiB
    assert 8.0e9 < hybrid["total"] < 8.6e9  # ~8 GB
    assert 31.0e9 < all_mla["total"] < 33.0e9  # ~31-32 GB (30.4 GiB)
    assert 0.72 < 1 - hybrid["total"] / all_mla["total"] < 0.76  # the paper's "74% smaller"


@torch.no_grad()
def test_forward_cache_bf16_close_to_full():
    model = KimiLinearForCausalLM(KimiLinearConfig.preset("tiny")).to(torch.bfloat16).eval()
    ids = torch.randint(0, 512, (2, 10))
    cache = HybridCache.allocate(model.config, 2, 10, dtype=torch.bfloat16)
    got = torch.cat([model(ids[:, :6], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                                 for t in range(6, 10)], 1)
    full = model(ids).logits
    assert got.dtype == torch.bfloat16 and cache.kda[0].state.dtype == torch.float32
    assert _rel(got.double(), full.double()) < 2e-2


@pytest.mark.parametrize("schedule", ["all_mla", "all_kda", "mla_every:2"])
@torch.no_grad()
def test_forward_cache_other_schedules(schedule):
    cfg = KimiLinearConfig.preset("tiny").with_schedule(schedule)
    model = KimiLinearForCausalLM(cfg).to(torch.float64).eval()
    ids = torch.randint(0, 512, (2, 9))
    cache = HybridCache.allocate(cfg, 2, 9, dtype=torch.float64)
    got = torch.cat([model(ids[:, :5], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                                 for t in range(5, 9)], 1)
    assert _rel(got, model(ids).logits) < MAX_ERR
    assert cache.nbytes() == predict_cache_bytes(cfg, 2, 9, torch.float64)["total"]
    assert len(cache.mla) == cfg.num_mla_layers and len(cache.kda) == cfg.num_kda_layers
