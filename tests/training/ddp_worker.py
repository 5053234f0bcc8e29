"""Run by tests/training/test_ddp.py, alone or under `torchrun --nproc_per_node 2`: trains a tiny model a few
steps on a fixed global batch and writes the per-step losses (rank 0) to the JSON file named in argv[1]."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import build_tiny_model  # noqa: E402

from hla.data.tasks import Stack  # noqa: E402
from hla.training.distributed import init_distributed, shutdown_distributed  # noqa: E402
from hla.training.trainer import TrainConfig, Trainer  # noqa: E402


def main(out: str, micro: int | None) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    task = Stack(vocab_size=64, num_stacks=8)
    cfg = TrainConfig(steps=4, batch_size=8, micro_batch_size=micro, seq_len=32, lr=3e-3, warmup_steps=1,
                      log_every=1, progress=False)
    tr = Trainer(build_tiny_model(64), task, cfg, dist_info=info)
    losses = [r["loss"] for r in tr.train()]
    params = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    if info.is_main:
        Path(out).write_text(json.dumps({"losses": losses, "param_sum": float(params.double().sum()),
                                         "world": info.world_size}))
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
