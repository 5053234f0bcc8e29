"""``hla bench`` end to end on the CPU with the tiny config (a smoke run: the numbers mean nothing here)."""

import json

from hla.cli import main


def test_cli_bench_measures_both_models_and_writes_json_markdown_plots(tmp_path, capsys):
    rc = main(["bench", "--config", "tiny", "--contexts", "64", "--prefill-lengths", "8", "16", "--steps", "1",
               "--device", "cpu", "--out-dir", str(tmp_path)])
    assert rc == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"claims.json", "claims.md", "tpot_vs_context.png", "throughput_vs_context.png",
            "cache_vs_context.png"} <= names
    res = json.loads((tmp_path / "claims.json").read_text())
    h, m = res["hybrid"], res["all_mla"]
    assert res["meta"]["card"] == "cpu"
    assert set(m["schedule"]) == {"M"} and "K" in h["schedule"]
    for p in h["points"] + m["points"]:
        assert p["cache_measured"] == p["cache_pred"]
        assert p["tpot"] > 0 and p["max_batch"] >= 1 and p["throughput"] > 0
    # From ~24 tokens on (fp32), the tiny hybrid's cache (fixed KDA state + one MLA layer) beats all-MLA's.
    assert h["points"][0]["cache_pred"] < m["points"][0]["cache_pred"]
    assert all(q["seconds"] > 0 for q in h["prefill"] + m["prefill"])
    assert "| context |" in capsys.readouterr().out
