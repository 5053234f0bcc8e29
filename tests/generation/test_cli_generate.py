from hla.cli import main


def test_cli_generate_random_init_streams_and_reports(capsys):
    rc = main(["generate", "--random-init", "tiny", "--prompt", "héllo", "--max-new-tokens", "5",
               "--device", "cpu", "--ignore-eos", "--temperature", "0.7", "--seed", "1"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert out.startswith("héllo")
    assert "tokens/s" in err and "cache:" in err and "predicted" in err


def test_cli_generate_from_saved_model_dir(tmp_path, capsys):
    import torch

    from hla.models import KimiLinearConfig, KimiLinearForCausalLM

    torch.manual_seed(0)
    KimiLinearForCausalLM(KimiLinearConfig.preset("tiny")).save_pretrained(tmp_path)
    rc = main(["generate", "--model", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "4", "--device", "cpu"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert out.startswith("abc") and "first token" in err
