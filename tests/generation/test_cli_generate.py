from hla.cli import main


def test_cli_generate_random_init_streams_and_reports(capsys):
    rc = main(["generate", "--random-init", "tiny", "--prompt", "héllo", "--max-new-tokens", "5",
               "--device", "cpu", "--ignore-eos", "--temperature", "0.7", "--seed", "1"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert out.startswith("héllo")
    assert "tokens/s" in err and "cache:" in err and "predicted" in err
