import json

import torch

from hla.cli import main


def test_train_then_resume_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--config", "tiny", "--task", "palindrome", "--task-vocab", "16", "--seq-len", "24",
              "--batch-size", "4", "--out", str(out), "--eval-lengths", "24,48", "--eval-examples", "8",
              "--log-every", "1", "--no-progress"]
    assert main([*common, "--steps", "3"]) == 0
    for f in ("run.json", "metrics.jsonl", "loss.png", "eval.json", "checkpoint/model.safetensors",
              "checkpoint/config.json", "checkpoint/optimizer.safetensors", "checkpoint/trainer_state.json"):
        assert (out / f).exists(), f
    assert main([*common, "--steps", "5", "--resume"]) == 0
    assert "resumed at step 3" in capsys.readouterr().out
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert main(["eval", "--model", str(out), "--lengths", "24", "--num-examples", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "palindrome" and 0.0 <= result["accuracy"]["24"] <= 1.0


def test_demo_pieces():
    from hla.demo import CPU_PLAN, kda_self_check, model_pair

    assert all(r.ok for r in kda_self_check(torch.device("cpu")))
    hybrid, twin = model_pair(CPU_PLAN)
    assert hybrid.schedule_string() == "KKKM" and twin.schedule_string() == "MMMM"
    a, b = hybrid.parameter_counts()["total"], twin.parameter_counts()["total"]
    assert abs(a - b) / a < 0.02
