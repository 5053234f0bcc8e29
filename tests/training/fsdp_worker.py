"""Run by tests/training/test_fsdp.py under `torchrun --nproc_per_node 2`: FSDP2-trains a tiny model with
gradient accumulation, checkpointing at step 2 and at the end, then resumes twice from step 2 (its own
checkpoint, and the single-process checkpoint named in argv[3]); rank 0 writes the per-step losses to argv[1]."""

import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import build_tiny_model  # noqa: E402

from hla.data.tasks import Stack  # noqa: E402
from hla.training.distributed import init_distributed, shutdown_distributed  # noqa: E402
from hla.training.trainer import TrainConfig, Trainer  # noqa: E402

CFG = dict(steps=4, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=1, log_every=1, progress=False)


def trainer(info, out_dir=None, micro=None) -> Trainer:
    cfg = TrainConfig(**CFG, micro_batch_size=micro, out_dir=out_dir, parallel="fsdp")
    return Trainer(build_tiny_model(64, moe_tied=True), Stack(vocab_size=64, num_stacks=8), cfg, dist_info=info)


def main(out: str, work: str, single_ck2: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    work = Path(work)
    # 2 ranks x 2 micro-batches of 2 = the global batch of 8
    tr = trainer(info, out_dir=str(work / "fsdp_run"), micro=2)
    tr.train(until=2)
    tr.save(work / "fsdp_ck2")
    losses = [r["loss"] for r in tr.train()]  # the whole history; ends by saving fsdp_run/checkpoint
    resumed = {}
    for name, ck in (("own", work / "fsdp_ck2"), ("single", Path(single_ck2))):
        tr = trainer(info)
        tr.resume(ck)
        resumed[name] = [r["loss"] for r in tr.train()]
    if info.is_main:
        Path(out).write_text(json.dumps({"losses": losses, "resumed": resumed, "world": info.world_size,
                                         "fsdp_groups": [n for n, m in tr.model.named_modules()
                                                         if isinstance(m, FSDPModule)]}))
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
