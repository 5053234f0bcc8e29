"""``hla bench`` end to end on the CPU with the tiny preset, plus the arithmetic it reports."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from hla.bench.claims import (
    build_model,
    decode_workspace_bytes,
    predict_max_batch,
    resolve_config,
    scaling_exponent,
    weight_nbytes,
)
from hla.bench.options import parse_length
from hla.cli import build_parser
from hla.generation.cache import predict_cache_bytes
from hla.models import KimiLinearConfig

SECTIONS = {"meta", "cache", "tpot", "breakdown", "throughput", "max_batch_predicted", "prefill", "summary"}


def test_hla_bench_tiny_cpu_end_to_end(tmp_path):
    argv = ["bench", "--config", "tiny", "--device", "cpu", "--contexts", "32", "64", "--prefill-lengths", "16", "32",
            "--steps", "2", "--warmup", "1", "--max-batch", "2", "--memory-gb", "0.05", "--out-dir", str(tmp_path),
            "--name", "claims-tiny", "--no-progress"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0

    res = json.loads((tmp_path / "claims-tiny.json").read_text())
    assert SECTIONS <= set(res)
    assert {"card", "date", "command", "schedules", "cache_fill"} <= set(res["meta"])
    assert res["meta"]["schedules"] == {"hybrid": "KKKM", "all_mla": "MMMM"}

    # Cache: every context allocated for both models, measured bytes == predicted bytes.
    assert [r["context"] for r in res["cache"]] == [32, 64]
    for r in res["cache"]:
        for m in ("hybrid", "all_mla"):
            assert r[m]["measured"] == r[m]["predicted"]["total"] > 0
        assert r["kv_reduction_pct"] == pytest.approx(75.0)  # 1 of 4 layers MLA vs 4 of 4
    assert res["summary"]["cache_measured_equals_predicted"] is True

    # Decode, throughput, breakdown and prefill all produced numbers for both models.
    points = {(m, c) for m in ("hybrid", "all_mla") for c in (32, 64)}
    assert {(r["model"], r["context"]) for r in res["tpot"]} == points
    assert all(r["ms"] > 0 and r["mode"] == "eager" and r["batch"] == 1 for r in res["tpot"])
    assert all(r["tokens_per_s"] > 0 and 1 <= r["batch"] <= 2 for r in res["throughput"])
    assert len(res["throughput"]) == 4
    for m in ("hybrid", "all_mla"):
        bd = res["breakdown"][m]
        assert len(bd["layers"]) == 4 and bd["step_ms"] > 0
        assert bd["num_mla"] == (1 if m == "hybrid" else 4)
        assert [r["length"] for r in res["prefill"][m]] == [16, 32]
    assert {"tpot_speedup", "throughput_speedup", "prefill_speedup"} <= set(res["summary"])

    md = (tmp_path / "claims-tiny.md").read_text()
    assert "Card:" in md and "Command:" in md and "random latents" in md
    for name in ("tpot", "throughput", "cache"):
        png = tmp_path / f"claims-tiny-{name}_vs_context.png"
        assert png.stat().st_size < 200_000

    # --replot re-renders from the JSON alone.
    args = build_parser().parse_args(["bench", "--replot", str(tmp_path / "claims-tiny.json"), "--out-dir",
                                      str(tmp_path / "re"), "--no-plots"])
    assert args.func(args) == 0
    assert (tmp_path / "re" / "claims-tiny.md").read_text() == md


def test_48b_cache_prediction_matches_the_paper():
    cfg = KimiLinearConfig.preset("kimi-linear-48b")
    twin = cfg.with_schedule("all_mla")
    assert (cfg.num_mla_layers, twin.num_mla_layers) == (7, 27)
    for ctx in (4096, 32768, 131072, 524288, 1048576):
        h, a = predict_cache_bytes(cfg, 1, ctx), predict_cache_bytes(twin, 1, ctx)
        assert 1 - h["mla_latent"] / a["mla_latent"] >= 0.74  # 1 - 7/27 = 74.07%
    h, a = predict_cache_bytes(cfg, 1, 1 << 20), predict_cache_bytes(twin, 1, 1 << 20)
    assert 8.4e9 < h["total"] < 8.6e9 and 32.5e9 < a["total"] < 32.7e9
    # The fixed KDA state (~42 MB) keeps the total reduction just under the latent ratio.
    assert 0.739 < 1 - h["total"] / a["total"] < 0.7407


def test_predict_max_batch_counts_cache_and_workspace():
    cfg, _ = resolve_config("scaled-2b")
    per_seq = predict_cache_bytes(cfg, 1, 1024 + 64)["total"] + decode_workspace_bytes(cfg, 1024 + 64)
    assert predict_max_batch(cfg, 1024, 10 * per_seq + 5, 0, torch.bfloat16) == 10
    assert predict_max_batch(cfg, 1024, 10 * per_seq, 2 * per_seq, torch.bfloat16) == 8
    assert predict_max_batch(cfg, 1024, 10 * per_seq, 0, torch.bfloat16, cap=4) == 4
    assert predict_max_batch(cfg, 1 << 20, 1 << 30, 0, torch.bfloat16) == 0
    assert 2.2e9 < cfg.parameter_counts()["total"] < 2.4e9


def test_scaling_exponent_and_lengths():
    assert scaling_exponent([(n, 3e-9 * n**1.5) for n in (1024, 4096, 16384)]) == pytest.approx(1.5)
    assert scaling_exponent([(1024, 1.0)]) is None
    assert [parse_length(x) for x in ("4096", "4K", "128k", "1M")] == [4096, 4096, 131072, 1 << 20]
    with pytest.raises(argparse.ArgumentTypeError, match="4K or 1M"):
        parse_length("lots")
    with pytest.raises(ValueError, match="stages"):
        args = build_parser().parse_args(["bench", "--config", "tiny", "--device", "cpu", "--stages", "tpot,nope"])
        args.func(args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_nbytes_formula_matches_a_built_model(dtype):
    cfg = KimiLinearConfig.preset("tiny")
    model = build_model(cfg, torch.device("cpu"), dtype)
    assert weight_nbytes(cfg, dtype) == sum(p.numel() * p.element_size() for p in model.parameters())


def test_summary_speedups_pair_the_longest_common_context():
    from hla.bench.claims import _summary

    def tp(model, ctx, ms, batch=1):
        return {"model": model, "context": ctx, "ms": ms, "batch": batch, "tokens_per_s": batch / (ms / 1e3)}

    res = {
        "cache": [],
        "tpot": [tp("hybrid", 4096, 2.0), tp("all_mla", 4096, 3.0), tp("hybrid", 1 << 20, 5.0),
                 tp("all_mla", 1 << 20, 12.5), tp("hybrid", 1 << 21, 9.0)],  # 2M: no twin point, not paired
        "throughput": [tp("hybrid", 1 << 20, 20.0, batch=9), tp("all_mla", 1 << 20, 25.0, batch=2)],
        "prefill": {"hybrid": [{"length": 4096, "s": 1.0}, {"length": 8192, "s": 2.0}],
                    "all_mla": [{"length": 4096, "s": 1.5}, {"length": 8192, "s": 4.0}],
                    "extrapolated": [{"length": 1 << 20, "hybrid_s": 256.0, "all_mla_s": 1024.0}]},
    }
    s = _summary(res)
    assert s["tpot_speedup"]["context"] == 1 << 20 and s["tpot_speedup"]["ours"] == pytest.approx(2.5)
    assert s["tpot_speedup"]["paper"] == 2.2
    # 9 rows / 20 ms vs 2 rows / 25 ms
    assert s["throughput_speedup"]["ours"] == pytest.approx((9 / 0.020) / (2 / 0.025))
    # Best rate per model, batch 1 included: hybrid 450 tok/s (batch 9) vs all-MLA max(80, 1000 / 12.5) = 80.
    assert s["throughput_speedup_best"]["ours"] == pytest.approx(450 / 80)
    assert s["prefill_speedup"] == {"length": 8192, "ours": 2.0, "paper": None}
    assert s["prefill_speedup_1m_extrapolated"]["ours"] == pytest.approx(4.0)
