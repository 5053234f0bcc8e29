"""The Kimi Linear report's synthetic setup (arXiv 2510.26692, "synthetic tests"): 2 layers, 2 heads of
dim 128, KDA-only vs MLA-only, MQAR and Palindrome at length 1024, a subset of the lr grid
{5e-5, 1e-4, 5e-4, 1e-3}. The report trains up to 20K steps; this script takes a step budget and a wall-clock
guard so it fits a short GPU slot, and records what it could run.

    PYTHONPATH=src python benchmarks/synthetic_tasks.py --steps 300 --lrs 5e-4,1e-3 --out results/
writes synthetic.json, synthetic.png (answer accuracy against step) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hla.data.tasks import MQAR, Palindrome
from hla.models import KimiLinearConfig, KimiLinearForCausalLM
from hla.training.evaluate import task_accuracy
from hla.training.trainer import TrainConfig, Trainer


def paper_config(mixer: str, vocab: int) -> KimiLinearConfig:
    """2 layers, 2 heads of 128 (hidden 256), dense SwiGLU MLP; mixer 'kda' (both layers KDA) or 'mla'."""
    return KimiLinearConfig.preset("tiny").replace(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=128, qk_nope_head_dim=128,
        qk_rope_head_dim=32, v_head_dim=128,
        linear_attn_config={"full_attn_layers": [2], "kda_layers": [1], "head_dim": 128, "num_heads": 2,
                            "short_conv_kernel_size": 4},
        first_k_dense_replace=2, num_experts=None, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        model_max_length=1 << 17,
    ).with_schedule("all_kda" if mixer == "kda" else "all_mla")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lrs", default="5e-4,1e-3")
    ap.add_argument("--tasks", default="mqar,palindrome")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-examples", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip runs that would start after this")
    ap.add_argument("--mqar-vocab", type=int, default=8192)
    ap.add_argument("--mqar-kv", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = {"mqar": MQAR(vocab_size=args.mqar_vocab, num_kv_pairs=args.mqar_kv),
             "palindrome": Palindrome(vocab_size=64)}
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    t_all = time.perf_counter()
    results = []
    for tname in args.tasks.split(","):
        task = tasks[tname]
        for lr in (float(x) for x in args.lrs.split(",")):
            for mixer in ("kda", "mla"):
                if time.perf_counter() - t_all > args.budget_s:
                    results.append({"task": tname, "mixer": mixer, "lr": lr, "skipped": "time budget"})
                    continue
                torch.manual_seed(0)
                model = KimiLinearForCausalLM(paper_config(mixer, task.vocab_size))
                cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=lr,
                                  warmup_steps=max(1, args.steps // 10), log_every=10, progress=False, seed=0,
                                  weight_decay=0.1)
                tr = Trainer(model, task, cfg)
                t0 = time.perf_counter()
                hist = tr.train(eval_fn=lambda m, task=task: {
                    "acc": task_accuracy(m, task, args.seq_len, num_examples=args.eval_examples, batch_size=32)},
                    eval_every=args.eval_every)
                dt = time.perf_counter() - t0
                curve = [(r["step"], r["acc"]) for r in hist if "acc" in r]
                rec = {"task": tname, "mixer": mixer, "lr": lr, "steps": args.steps, "seconds": dt,
                       "final_loss": hist[-1]["loss"], "final_acc": curve[-1][1], "curve": curve,
                       "params": sum(p.numel() for p in model.parameters())}
                results.append(rec)
                print(f"{tname} {mixer} lr={lr:g}: acc {rec['final_acc']:.3f} loss {rec['final_loss']:.3f} "
                      f"({dt:.0f}s)", flush=True)
    meta = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "batch_size": args.batch_size, "mqar": tasks["mqar"].__dict__,
            "palindrome": tasks["palindrome"].__dict__, "seq_len": args.seq_len, "steps": args.steps,
            "kda_backend": "auto (triton if importable on CUDA, else the torch chunked path)"}
    (out / "synthetic.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = args.tasks.split(",")
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, tname in zip(axes[0], names, strict=True):
        for r in results:
            if r["task"] == tname and "curve" in r:
                ax.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], marker="o",
                        ls="-" if r["mixer"] == "kda" else "--", label=f"{r['mixer'].upper()} lr {r['lr']:g}")
        ax.set(title=f"{tname}, length {args.seq_len}", xlabel="step", ylabel="answer accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"2 layers x 2 heads x 128: KDA vs MLA ({card})")
    fig.tight_layout()
    fig.savefig(out / "synthetic.png", dpi=110)

    print("\n| task | mixer | lr | steps | final answer acc | final loss | s |\n|---|---|---|---|---|---|---|")
    for r in results:
        if "skipped" in r:
            print(f"| {r['task']} | {r['mixer']} | {r['lr']:g} | - | skipped ({r['skipped']}) | | |")
        else:
            print(f"| {r['task']} | {r['mixer'].upper()} | {r['lr']:g} | {r['steps']} | {r['final_acc']:.3f} | "
                  f"{r['final_loss']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
