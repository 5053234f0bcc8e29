"""``hla train`` and ``hla eval``: build a model and a task from command-line arguments, train, evaluate.

A run directory holds::

    run.json            what was trained: task name and fields, model schedule, text tokenizer (if any)
    metrics.jsonl       one JSON record per logged step; loss.png the curve
    checkpoint/         model.safetensors + config.json + optimizer/RNG/loop state (see training.checkpoint)
    tokenizer.json      text runs only
    eval.json           accuracy by length (synthetic tasks) or held-out perplexity (text)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from hla.data.tasks import make_task
from hla.training.checkpoint import load_weights
from hla.training.distributed import init_distributed, shutdown_distributed
from hla.training.evaluate import DEFAULT_LENGTHS, accuracy_by_length, perplexity
from hla.training.trainer import TrainConfig, Trainer

SYNTHETIC = ("mqar", "palindrome", "stack")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="model preset name (tiny, small, 1b...) or a config.json path")
    p.add_argument("--schedule", default=None, help="layer schedule: 3:1, all_mla, all_kda, mla_every:N")
    p.add_argument("--task", required=True, choices=[*SYNTHETIC, "text"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="cosine", choices=["cosine", "wsd", "constant"])
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32, help="global sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=None, help="per process and forward (accumulation)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if it exists")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate at --seq-len every N steps (0: at the end)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="under torchrun: DDP (replicated model) or FSDP2 (sharded per decoder block)")
    p.add_argument("--no-progress", action="store_true")
    _add_task_arguments(p)
    p.add_argument("--eval-lengths", default=None, help="comma-separated (default 256,512,1024,2048)")
    p.add_argument("--eval-examples", type=int, default=128)


def _add_task_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task-vocab", type=int, default=None, help="synthetic task vocabulary (default: the model's)")
    p.add_argument("--num-kv-pairs", type=int, default=None, help="MQAR key-value pairs (default 8)")
    p.add_argument("--num-stacks", type=int, default=None, help="Stack: number of stacks (default 64)")
    p.add_argument("--text-vocab", type=int, default=2048, help="BPE vocabulary for --task text")
    p.add_argument("--cache-dir", default=None, help="download/tokenizer cache (default ~/.cache/hla)")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a run directory of `hla train` (or its checkpoint/)")
    p.add_argument("--task", default=None, choices=[*SYNTHETIC, "text"], help="default: the task it was trained on")
    p.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default 256,512,1024,2048)")
    p.add_argument("--num-examples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256, help="window for text perplexity")
    p.add_argument("--device", default=None)
    _add_task_arguments(p)


def model_config(spec: str, schedule: str | None, vocab_size: int | None):
    from hla.models import KimiLinearConfig

    path = Path(spec)
    cfg = KimiLinearConfig.from_json(path) if path.suffix == ".json" or path.is_dir() else KimiLinearConfig.preset(spec)
    if schedule:
        cfg = cfg.with_schedule(schedule)
    if vocab_size is not None and vocab_size != cfg.vocab_size:
        cfg = cfg.replace(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return cfg


def task_from_args(name: str, args: argparse.Namespace, default_vocab: int):
    kwargs: dict[str, Any] = {"vocab_size": args.task_vocab or default_vocab}
    if name == "mqar" and args.num_kv_pairs is not None:
        kwargs["num_kv_pairs"] = args.num_kv_pairs
    if name == "stack" and args.num_stacks is not None:
        kwargs["num_stacks"] = args.num_stacks
    return make_task(name, **kwargs)


def _cache_dir(args) -> Path:
    return Path(args.cache_dir) if args.cache_dir else Path.home() / ".cache" / "hla"


def _lengths(s: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",")) if s else DEFAULT_LENGTHS


def run_train(args: argparse.Namespace) -> int:
    from hla.models import KimiLinearConfig, KimiLinearForCausalLM

    info = init_distributed(args.device)
    out = Path(args.out)
    run: dict[str, Any] = {"task": args.task}
    if args.task == "text":
        from hla.data.text import prepare_shakespeare

        data, tok_path = prepare_shakespeare(_cache_dir(args), args.text_vocab)
        cfg = model_config(args.config, args.schedule, data.vocab_size)
        run["tokenizer"] = "tokenizer.json"
    else:
        base = model_config(args.config, args.schedule, None)
        data = task_from_args(args.task, args, base.vocab_size)
        cfg = model_config(args.config, args.schedule, data.vocab_size)
        run["task_fields"] = {k: v for k, v in dataclasses.asdict(data).items() if k != "name"}
    if args.resume and (out / "checkpoint" / "config.json").exists():
        cfg = KimiLinearConfig.from_json(out / "checkpoint" / "config.json")
    torch.manual_seed(args.seed)
    model = KimiLinearForCausalLM(cfg)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                       seq_len=args.seq_len, lr=args.lr, schedule=args.lr_schedule,
                       warmup_steps=args.warmup if args.warmup is not None else max(1, args.steps // 20),
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                       log_every=args.log_every, save_every=args.save_every, out_dir=str(out),
                       progress=not args.no_progress, parallel=args.parallel)
    trainer = Trainer(model, data, tcfg, dist_info=info, extra_state={"run": run})
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        n = sum(p.numel() for p in model.parameters())
        print(f"model: {n / 1e6:.2f}M parameters, layers {cfg.schedule_string()}, vocab {cfg.vocab_size}; "
              f"task {args.task}; {info.world_size} process(es) on {info.device}"
              + (f" ({args.parallel})" if info.enabled else ""))
        if args.task == "text":
            shutil.copy(tok_path, out / "tokenizer.json")
        (out / "run.json").write_text(json.dumps(run, indent=1))
    if args.resume and (out / "checkpoint").exists():
        trainer.resume(out / "checkpoint")
        if info.is_main:
            print(f"resumed at step {trainer.step}")

    eval_fn = None
    if args.eval_every:
        if args.task == "text":
            eval_fn = lambda m: {"eval_ppl": perplexity(m, data.held_out, args.seq_len, max_windows=32)}  # noqa: E731
        else:
            from hla.training.evaluate import task_accuracy

            eval_fn = lambda m: {f"eval_acc_{args.seq_len}": task_accuracy(  # noqa: E731
                m, data, args.seq_len, num_examples=args.eval_examples)}
    t0 = time.perf_counter()
    trainer.train(eval_fn=eval_fn, eval_every=args.eval_every)
    if info.is_main:
        print(f"trained {trainer.step} steps in {time.perf_counter() - t0:.1f}s; run directory {out}")
        if trainer.fsdp:  # rank 0 alone cannot run the sharded model: evaluate the gathered final checkpoint
            model = load_run_model(out, info.device)
        else:
            model = trainer.model.module if info.enabled else trainer.model
        result = _evaluate(model, args.task, data, _lengths(args.eval_lengths), args.eval_examples,
                           min(16, args.batch_size), args.seq_len)
        (out / "eval.json").write_text(json.dumps(result, indent=1))
    shutdown_distributed()
    return 0


def _evaluate(model, task_name: str, data, lengths, num_examples: int, batch_size: int, seq_len: int) -> dict:
    if task_name == "text":
        ppl = perplexity(model, data.held_out, seq_len, batch_size=batch_size)
        print(f"held-out perplexity (windows of {seq_len}): {ppl:.2f}")
        return {"task": "text", "held_out_perplexity": ppl, "seq_len": seq_len}
    acc = accuracy_by_length(model, data, lengths, num_examples=num_examples, batch_size=batch_size)
    print(f"{task_name} answer accuracy by length: " + ", ".join(f"{L}: {a:.3f}" for L, a in acc.items()))
    return {"task": task_name, "accuracy": acc}


def load_run_model(path: str | Path, device: torch.device):
    """The model of a run directory (or a checkpoint directory): config.json + model.safetensors."""
    from hla.models import KimiLinearConfig, KimiLinearForCausalLM

    path = Path(path)
    ck = path / "checkpoint" if (path / "checkpoint").is_dir() else path
    if not (ck / "model.safetensors").exists():
        from hla.models import load_model  # a release-format directory (sharded, release tensor names)

        return load_model(ck, device=device)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_json(ck / "config.json"))
    load_weights(model, ck / "model.safetensors")
    return model.to(device)


def run_eval(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = Path(args.model)
    run = json.loads((root / "run.json").read_text()) if (root / "run.json").exists() else {}
    task_name = args.task or run.get("task")
    if task_name is None:
        raise ValueError("--task is needed: the model directory has no run.json naming its task")
    model = load_run_model(root, device)
    if task_name == "text":
        from hla.data.text import prepare_shakespeare

        data, _ = prepare_shakespeare(_cache_dir(args), args.text_vocab)
        if data.vocab_size != model.config.vocab_size:
            raise ValueError(f"--text-vocab {args.text_vocab} gives {data.vocab_size} tokens, the model has "
                             f"{model.config.vocab_size}")
    elif task_name == run.get("task") and args.task_vocab is None and args.num_kv_pairs is None \
            and args.num_stacks is None:
        data = make_task(task_name, **run["task_fields"])
    else:
        data = task_from_args(task_name, args, model.config.vocab_size)
    result = _evaluate(model, task_name, data, _lengths(args.lengths), args.num_examples, args.batch_size,
                       args.seq_len)
    print(json.dumps(result))
    return 0
