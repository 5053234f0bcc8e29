"""``hla bench`` end to end on the CPU with the tiny config (a smoke run: the numbers mean nothing here)."""

import json

import torch

from hla.cli import main
from hla.generation.claims import run_claims
from hla.models import KimiLinearConfig


def test_run_claims_measured_cache_matches_prediction_and_twin_is_all_mla():
    res = run_claims(KimiLinearConfig.preset("tiny"), contexts=[32], prefill_lengths=[8, 16], device="cpu",
                     dtype=torch.float32, steps=1, progress=False)
    h, m = res["hybrid"], res["all_mla"]
    assert set(m["schedule"]) == {"M"} and "K" in h["schedule"]
    for p in h["points"] + m["points"]:
        assert p["cache_measured"] == p["cache_pred"]
        assert p["tpot"] > 0 and p["max_batch"] >= 1 and p["throughput"] > 0
    assert h["points"][0]["cache_pred"] < m["points"][0]["cache_pred"]
    assert all(q["seconds"] > 0 for q in h["prefill"] + m["prefill"])


def test_cli_bench_writes_json_markdown_and_plots(tmp_path, capsys):
    rc = main(["bench", "--config", "tiny", "--contexts", "16", "--prefill-lengths", "8", "--steps", "1",
               "--device", "cpu", "--out-dir", str(tmp_path)])
    assert rc == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"claims.json", "claims.md", "tpot_vs_context.png", "throughput_vs_context.png",
            "cache_vs_context.png"} <= names
    assert json.loads((tmp_path / "claims.json").read_text())["meta"]["card"] == "cpu"
    assert "| context |" in capsys.readouterr().out
