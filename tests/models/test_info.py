from hla.cli import main


def test_hla_info_48b_prints_schedule_and_cache(capsys):
    assert main(["info", "kimi-linear-48b"]) == 0
    out = capsys.readouterr().out
    assert "49.12 B" in out
    assert "20 KDA + 7 MLA" in out and "[3, 7, 11, 15, 19, 23, 26]" in out
    lines = out.splitlines()
    hybrid = lines[lines.index(next(x for x in lines if x.startswith("cache (this model"))) + 1]
    twin = lines[lines.index(next(x for x in lines if x.startswith("cache (all-MLA twin"))) + 1]
    assert "1M: 7.9 GiB (8.50 GB)" in hybrid
    assert "1M: 30.4 GiB (32.61 GB)" in twin


def test_hla_info_reads_a_checkpoint_dir(tmp_path, capsys):
    from hla.models.config import KimiLinearConfig

    KimiLinearConfig.preset("tiny").to_json(tmp_path / "config.json")
    assert main(["info", str(tmp_path)]) == 0
    assert "KKKM" in capsys.readouterr().out
