import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hla.data.tasks import Stack
from hla.training.trainer import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_worker import CFG  # noqa: E402

WORKER = Path(__file__).parent / "fsdp_worker.py"


def _trainer(make_model, out_dir=None) -> Trainer:
    return Trainer(make_model(64, moe_tied=True), Stack(vocab_size=64, num_stacks=8),
                   TrainConfig(**CFG, out_dir=out_dir))


@pytest.mark.timeout(240)
def test_fsdp_two_processes_match_one_process_and_share_checkpoints(tmp_path, make_model):
    # one process, whole batch: losses, a checkpoint at step 2, final weights
    one = _trainer(make_model, out_dir=str(tmp_path / "one_run"))
    one.train(until=2)
    one.save(tmp_path / "one_ck2")
    losses = [r["loss"] for r in one.train()]  # train() returns the whole history

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(WORKER), str(tmp_path / "fsdp.json"), str(tmp_path), str(tmp_path / "one_ck2")],
                         env=env, capture_output=True, text=True, timeout=230)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads((tmp_path / "fsdp.json").read_text())
    assert got["world"] == 2
    # really sharded: the root, each block, and the fp32 groups (KDA with its gate, the MoE router)
    assert got["fsdp_groups"] == ["", "model.layers.0", "model.layers.0.self_attn", "model.layers.1",
                                  "model.layers.1.block_sparse_moe.gate"]

    def close(a, b):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)

    assert len(losses) == 4
    close(got["losses"], losses)
    # FSDP resumed from its own and from the single-process checkpoint: steps 3-4 as uninterrupted
    close(got["resumed"]["own"], losses[2:])
    close(got["resumed"]["single"], losses[2:])

    # the gathered FSDP checkpoint has the single-process file's names and shapes, and its values up to the
    # summation order of gradients: ||a - b|| / ||b|| per tensor (elementwise, Adam amplifies round-off where
    # a gradient is ~0: up to 2e-6 absolute on weights of 0.08 was seen)
    def rel(x, y):
        return float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30))

    a = load_file(str(tmp_path / "fsdp_run" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "one_run" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and "model.embed_tokens.weight" not in a  # the tied alias is stored once
    assert any("block_sparse_moe" in k for k in a)
    for k in b:
        assert rel(a[k], b[k]) < 1e-5, (k, rel(a[k], b[k]))
    oa = load_file(str(tmp_path / "fsdp_run" / "checkpoint" / "optimizer.safetensors"))
    ob = load_file(str(tmp_path / "one_run" / "checkpoint" / "optimizer.safetensors"))
    assert oa.keys() == ob.keys()
    for k in ob:
        assert rel(oa[k], ob[k]) < 1e-5, (k, rel(oa[k], ob[k]))

    # and a single process resumes from the FSDP checkpoint of step 2
    back = _trainer(make_model)
    back.resume(tmp_path / "fsdp_ck2")
    close([r["loss"] for r in back.train()], losses[2:])


def test_parallel_mode_is_checked():
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(parallel="zero3")
