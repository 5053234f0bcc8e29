"""The training loop: AdamW, warmup + cosine/WSD, clipping, bf16 autocast on GPU, gradient accumulation,
DDP or FSDP2 through torchrun, exact checkpoint resume, JSONL metrics, a progress bar and a loss-curve PNG.

The loop reads top to bottom in :meth:`Trainer.train_step`. Two choices make results independent of how a
step is split over processes and micro-batches:

* the global batch of step ``s`` is a pure function of ``(seed, s)``; each rank takes its rows of it;
* the loss is the *sum* of token losses divided by the number of scored tokens in the whole global batch
  (every rank can count them, so no communication), so gradient accumulation and DDP give the gradient of
  one big batch, not an average of per-micro-batch means.

With ``parallel="fsdp"`` the model is sharded with FSDP2 (see :mod:`hla.training.fsdp`); the loop is the same,
FSDP's reduce-scatter averaging over ranks like DDP's all-reduce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from hla.data.tasks import IGNORE_INDEX, batch_at
from hla.training import checkpoint as ckpt
from hla.training.distributed import DistInfo
from hla.training.schedule import lr_multiplier


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``batch_size`` is global (sequences per optimizer step over all ranks)."""

    steps: int = 1000
    batch_size: int = 32
    micro_batch_size: int | None = None  # per rank and forward; None = the whole per-rank share
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # "cosine" | "wsd" | "constant"
    decay_frac: float = 0.2  # WSD only
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only at the end (when out_dir is set)
    out_dir: str | None = None
    progress: bool = True
    progress_desc: str = "train"
    parallel: str = "ddp"  # with several processes: "ddp" (replicated) or "fsdp" (FSDP2, sharded)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {self.micro_batch_size}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.warmup_steps > self.steps:
            self.warmup_steps = self.steps


def no_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Norm gains, biases, the KDA decay parameters (A_log, dt_bias) and every 1-D tensor are not decayed:
    shrinking them toward 0 changes what the layer computes rather than regularising it."""
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim < 2 or leaf in ("bias", "A_log", "dt_bias") or "norm" in name.lower()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device
                    ) -> tuple[torch.optim.AdamW, dict[torch.nn.Parameter, str]]:
    """AdamW with two groups (decay / no decay); fused kernels on CUDA. Returns the optimizer and param names."""
    names: dict[torch.nn.Parameter, str] = {}
    decay, plain = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad or p in names:
            continue
        names[p] = n
        (plain if no_decay(n, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    return opt, names


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy in fp32. logits: [B, T, V]; labels: [B, T] aligned with the inputs
    (position t predicts labels[:, t + 1]); -100 is ignored."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def global_batch(data: Any, index: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``index`` of a data source: anything with ``.batch(index, batch_size, seq_len, seed)`` (text) or a
    synthetic task with ``.sample`` (see hla.data.tasks)."""
    if hasattr(data, "batch"):
        return data.batch(index, batch_size, seq_len, seed)
    return batch_at(data, index, batch_size, seq_len, seed)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class Trainer:
    """Trains ``model`` (forward(input_ids) -> object with ``.logits [B, T, V]``) on ``data``.

    ``dist_info`` comes from :func:`hla.training.distributed.init_distributed` under torchrun; the model is
    moved to its device and, when there are several processes, wrapped in DDP or (``cfg.parallel == "fsdp"``)
    sharded in place with FSDP2. A single process ignores ``cfg.parallel``.
    """

    def __init__(self, model: torch.nn.Module, data: Any, cfg: TrainConfig, *, dist_info: DistInfo | None = None,
                 extra_state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.dist = dist_info or DistInfo(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = self.dist.device
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes "
                             f"({self.dist.world_size})")
        self.rank_batch = cfg.batch_size // self.dist.world_size
        self.micro = cfg.micro_batch_size or self.rank_batch
        if self.rank_batch % self.micro:
            raise ValueError(f"per-rank batch ({self.rank_batch}) must be divisible by micro_batch_size ({self.micro})")
        self.accum = self.rank_batch // self.micro

        model = model.to(self.device)
        self.fsdp = self.dist.enabled and cfg.parallel == "fsdp"
        if self.fsdp:
            from hla.training import fsdp

            # before the optimizer: fully_shard swaps in sharded parameters (same names)
            model = fsdp.shard_model(model, self.device)
        self.optimizer, self.param_names = build_optimizer(model, cfg, self.device)
        if self.dist.enabled and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model
        # bf16 autocast on GPU (weights and optimizer stay fp32); plain fp32 on the CPU
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.device.type == "cuda" \
            else contextlib.nullcontext
        self.step = 0
        self.tokens_seen = 0
        self.extra_state = extra_state or {}
        self.history: list[dict[str, Any]] = []
        self.out = Path(cfg.out_dir) if cfg.out_dir else None

    # ---- one optimizer step -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        lr = cfg.lr * lr_multiplier(cfg.schedule, self.step, cfg.steps, cfg.warmup_steps,
                                    **({"min_ratio": cfg.min_lr_ratio} if cfg.schedule == "cosine" else
                                       {"decay_frac": cfg.decay_frac} if cfg.schedule == "wsd" else {}))
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        input_ids, labels = global_batch(self.data, self.step, cfg.batch_size, cfg.seq_len, cfg.seed)
        if input_ids.shape != (cfg.batch_size, cfg.seq_len) or labels.shape != input_ids.shape:
            raise ValueError(f"data returned input_ids {tuple(input_ids.shape)} labels {tuple(labels.shape)}, "
                             f"expected {(cfg.batch_size, cfg.seq_len)}")
        n_scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
        lo = self.dist.rank * self.rank_batch
        input_ids, labels = input_ids[lo:lo + self.rank_batch], labels[lo:lo + self.rank_batch]

        # DDP and FSDP average gradients over ranks; scaling by world_size turns that average back into the sum
        scale = self.dist.world_size / max(n_scored, 1)
        loss_sum = torch.zeros((), device=self.device)
        for j in range(self.accum):
            x = input_ids[j * self.micro:(j + 1) * self.micro].to(self.device, non_blocking=True)
            y = labels[j * self.micro:(j + 1) * self.micro].to(self.device, non_blocking=True)
            last = j == self.accum - 1
            if self.fsdp:  # FSDP's counterpart of no_sync: keep unsharded grads until the last micro-batch
                self.model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            else:
                sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.model.no_sync()
            with sync:
                with self.autocast():
                    logits = self.model(x).logits
                part = token_loss_sum(logits, y)
                (part * scale).backward()
            loss_sum += part.detach()
        if self.dist.enabled:
            dist.all_reduce(loss_sum)  # a scalar for the log; the gradients were reduced by DDP/FSDP
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += cfg.batch_size * cfg.seq_len
        return {"step": self.step, "loss": loss_sum.item() / max(n_scored, 1), "lr": lr,
                "grad_norm": float(grad_norm)}

    # ---- the loop -----------------------------------------------------------------------------------------
    def train(self, until: int | None = None, eval_fn=None, eval_every: int = 0) -> list[dict[str, Any]]:
        """Run optimizer steps up to ``until`` (default cfg.steps). ``eval_fn(model) -> dict`` is called every
        ``eval_every`` steps and at the end; its numbers join the metrics log."""
        cfg = self.cfg
        until = cfg.steps if until is None else min(until, cfg.steps)
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=until, initial=self.step, desc=cfg.progress_desc, dynamic_ncols=True, leave=True)
        t_last, tok_last = time.perf_counter(), self.tokens_seen
        t_start = t_last
        while self.step < until:
            rec = self.train_step()
            if self.step % cfg.log_every == 0 or self.step == until:
                now = time.perf_counter()
                rec["tok_per_s"] = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                rec["elapsed_s"] = now - t_start
                rec["tokens"] = self.tokens_seen
                t_last, tok_last = now, self.tokens_seen
                if eval_fn is not None and eval_every and (self.step % eval_every == 0 or self.step == until):
                    self.model.eval()
                    with torch.no_grad(), self.autocast():
                        rec.update(eval_fn(_unwrap(self.model)))
                    self.model.train()
                self._log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tok_per_s']:.0f}")
            else:
                self.history.append(rec)
            if bar is not None:
                bar.update(1)
            if self.out is not None and cfg.save_every and self.step % cfg.save_every == 0:
                self.save(self.out / "checkpoint")
        if bar is not None:
            bar.close()
        if self.out is not None:
            self.save(self.out / "checkpoint")
            if self.dist.is_main:
                plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png")
        return self.history

    def _log(self, rec: dict[str, Any]) -> None:
        self.history.append(rec)
        if self.out is not None and self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ---- checkpoints --------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "train_config": dataclasses.asdict(self.cfg),
                "world_size": self.dist.world_size, **self.extra_state}

    def save(self, path: str | Path) -> None:
        if self.dist.enabled:
            dist.barrier()
        if self.fsdp:
            from hla.training.fsdp import save_checkpoint_fsdp

            save_checkpoint_fsdp(path, self.model, self.optimizer, self.param_names, self.state(), rank=self.dist.rank)
        else:
            ckpt.save_checkpoint(path, _unwrap(self.model), self.optimizer, self.param_names, self.state(),
                                 rank=self.dist.rank)
        if self.dist.enabled:
            dist.barrier()

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Restore everything from a checkpoint directory; the next step continues the interrupted run exactly."""
        if self.fsdp:
            from hla.training.fsdp import load_checkpoint_fsdp

            state = load_checkpoint_fsdp(path, self.model, self.optimizer, self.param_names, rank=self.dist.rank)
        else:
            state = ckpt.load_checkpoint(path, _unwrap(self.model), self.optimizer, self.param_names,
                                         rank=self.dist.rank)
        saved = state["train_config"]
        for key in ("batch_size", "seq_len", "seed"):
            if saved[key] != getattr(self.cfg, key):
                raise ValueError(f"resume with a different {key}: checkpoint {saved[key]}, "
                                 f"now {getattr(self.cfg, key)}")
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        if self.out is not None and self.dist.is_main and (self.out / "metrics.jsonl").exists():
            # drop records written after this checkpoint by the interrupted run, so the log has each step once
            lines = (self.out / "metrics.jsonl").read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            (self.out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))
        return state


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str | None = None) -> None:
    """Loss (and any ``eval_*`` accuracy) against step from a metrics JSONL file, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    if not recs:
        return
    evals = sorted({k for r in recs for k in r if k.startswith("eval_")})
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.6), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = axes[0, 1]
        for k in evals:
            pts = [(r["step"], r[k]) for r in recs if k in r]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k[5:])
        ax2.set_xlabel("step")
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
