"""``hla demo``: train a small Kimi Linear hybrid and its all-MLA twin on MQAR and show the trade-off.

Steps: (1) KDA self-check (fast path vs the float64 reference); (2) a 3:1 hybrid and an all-MLA twin with
the same parameter count (the twin's MLP width is adjusted); (3) both trained with the same data, steps,
batch and learning rate; (4) one table: parameters, recall accuracy by length, KV-cache bytes per token and at
128K context, greedy decode tokens/s; the same as a PNG (runs/demo/demo.png) and JSON.

On the CPU everything is sized to finish in a few minutes on 2 cores; with a GPU the models and sequences are
larger. Small models on few steps make the accuracy comparison noisy: treat a gap of a few points as a tie.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CONTEXT_128K = 128 * 1024
DEFAULT_CPU_TRAIN_BUDGET_S = 330.0  # both models together; evaluation and decoding add well under a minute


@dataclass(frozen=True)
class DemoPlan:
    hidden: int
    layers: int
    heads: int
    head_dim: int
    vocab: int
    num_kv_pairs: int
    train_len: int
    batch_size: int
    steps: int
    lr: float
    eval_lengths: tuple[int, ...]
    eval_examples: int
    decode_context: int
    decode_tokens: int


# CPU: a 32-token vocabulary and 4 pairs, so recall is learned in a few hundred steps (the 3:1 hybrid reached
# 95% at step 200 in a trial run); evaluated up to 8x the training length.
CPU_PLAN = DemoPlan(hidden=64, layers=4, heads=2, head_dim=32, vocab=32, num_kv_pairs=4, train_len=32,
                    batch_size=32, steps=400, lr=3e-3, eval_lengths=(32, 64, 128, 256), eval_examples=128,
                    decode_context=512, decode_tokens=64)
# GPU: the CPU recipe scaled up (wider, longer sequences, twice the pairs) and evaluated at the report's lengths.
# Only a 40-step smoke run of an earlier, harder GPU plan was made (H200); this plan's accuracy is not validated.
GPU_PLAN = DemoPlan(hidden=128, layers=4, heads=2, head_dim=64, vocab=128, num_kv_pairs=8, train_len=256,
                    batch_size=64, steps=1500, lr=2e-3, eval_lengths=(256, 512, 1024, 2048), eval_examples=256,
                    decode_context=8192, decode_tokens=128)


def kda_self_check(device: torch.device) -> list:
    """The KDA paths (chunked, varlen, decode; float64 and float32) against the float64 reference loop, from
    hla.ops.kda.selfcheck. Returns its rows (name, dtype, rel_error, tol, ok)."""
    from hla.ops.kda.selfcheck import run_selfcheck

    return run_selfcheck(device=device)


def model_pair(plan: DemoPlan):
    """The 3:1 hybrid and an all-MLA twin whose MLP width is chosen to match its parameter count."""
    from hla.models import KimiLinearConfig

    L, d, hd, H = plan.layers, plan.hidden, plan.head_dim, plan.heads
    base = KimiLinearConfig.preset("tiny").replace(
        vocab_size=plan.vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=H, kv_lora_rank=hd, qk_nope_head_dim=hd,
        qk_rope_head_dim=max(hd // 4, 1), v_head_dim=hd,
        linear_attn_config={"full_attn_layers": [L], "kda_layers": list(range(1, L)), "head_dim": hd,
                            "num_heads": H, "short_conv_kernel_size": 4},
        first_k_dense_replace=L, num_experts=None,  # dense MLPs: MoE routing is beside the point here
        bos_token_id=None, eos_token_id=None, pad_token_id=None, model_max_length=CONTEXT_128K,
    )
    hybrid = base.with_schedule("3:1")
    target = hybrid.parameter_counts()["total"]
    twin = base.with_schedule("all_mla")
    best = min(range(8, 16 * d + 1, 8),
               key=lambda w: abs(twin.replace(intermediate_size=w).parameter_counts()["total"] - target))
    return hybrid, twin.replace(intermediate_size=best)


@torch.no_grad()
def decode_tokens_per_s(model, context: int, new_tokens: int, device: torch.device) -> float:
    """Greedy decode of ``new_tokens`` after a ``context``-token prompt, batch 1, through the hybrid cache."""
    from hla.generation.cache import HybridCache

    model.eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cache = HybridCache.allocate(model.config, 1, context + new_tokens + 1, device=device, dtype=dtype)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)
    with ctx:
        tok = model(prompt.to(device), cache=cache, logits_to_keep=1).logits.argmax(-1)
        for _ in range(3):  # warm-up steps (allocations, kernel selection) are not timed
            tok = model(tok, cache=cache).logits.argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new_tokens - 3):
            tok = model(tok, cache=cache).logits.argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (new_tokens - 3) / (time.perf_counter() - t0)


def cpu_threads() -> int:
    """Threads to use on a CPU shared with other work: with 2 threads on 2 busy cores, OpenMP barriers made a
    training step 5x slower than with 1 thread (measured under a load average of 5), so count only free cores."""
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(n, int(n - load + 0.5)))


def seconds_per_step(cfg, plan: DemoPlan, task, device: torch.device, reps: int = 2) -> float:
    """Wall time of one forward+backward of a fresh model on a training batch (after one warm-up)."""
    from hla.data.tasks import batch_at
    from hla.models import KimiLinearForCausalLM
    from hla.training.trainer import token_loss_sum

    model = KimiLinearForCausalLM(cfg).to(device)
    x, y = batch_at(task, 0, plan.batch_size, plan.train_len, seed=12345)
    x, y = x.to(device), y.to(device)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        token_loss_sum(model(x).logits, y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def write_png(path: Path, rows: dict, plan: DemoPlan, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hla.generation.cache import predict_cache_bytes

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, r in rows.items():
        acc = r["accuracy"]
        axes[0].plot(list(acc), [100 * a for a in acc.values()], marker="o", label=f"{name} ({r['params'] / 1e3:.0f}K)")
        steps, losses = curves[name]
        axes[1].plot(steps, losses, label=name)
        ctx = [2 ** i for i in range(10, 18)]
        axes[2].plot(ctx, [predict_cache_bytes(r["config"], 1, c)["total"] / 2 ** 20 for c in ctx], marker=".",
                     label=f"{name}: {r['decode_tok_s']:.0f} tok/s decode")
    axes[0].set(xscale="log", xlabel="sequence length", ylabel="MQAR answer accuracy (%)", ylim=(0, 100),
                title=f"recall (trained at {plan.train_len})")
    axes[0].minorticks_off()
    axes[0].set_xticks(list(plan.eval_lengths), [str(x) for x in plan.eval_lengths])
    axes[1].set(yscale="log", xlabel="step", ylabel="train loss", title="training (same data, steps, lr)")
    axes[2].set(xscale="log", yscale="log", xlabel="context length", ylabel="cache MiB (bf16, batch 1)",
                title="KV cache vs context")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("hla demo: Kimi Linear 3:1 hybrid vs all-MLA twin")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    from hla.data.tasks import MQAR
    from hla.generation.cache import predict_cache_bytes
    from hla.models import KimiLinearForCausalLM
    from hla.training.evaluate import accuracy_by_length
    from hla.training.trainer import TrainConfig, Trainer

    t_start = time.perf_counter()
    device = torch.device(getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = GPU_PLAN if device.type == "cuda" else CPU_PLAN
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    out = Path(getattr(args, "out", None) or "runs/demo")
    out.mkdir(parents=True, exist_ok=True)
    print(f"hla demo on {device} ({torch.get_num_threads()} threads); output in {out}/", flush=True)

    checks = kda_self_check(device)
    failed = [r for r in checks if not r.ok]
    worst = max(checks, key=lambda r: r.rel_error / r.tol)
    print(f"[1/4] KDA self-check: {len(checks) - len(failed)}/{len(checks)} paths match the float64 reference "
          f"(worst {worst.name} {worst.dtype}: {worst.rel_error:.1e}, tol {worst.tol:.0e})", flush=True)
    for r in failed:
        print(f"      FAILED {r.name} {r.dtype}: {r.rel_error:.2e} > {r.tol:.0e}")
    if failed:
        return 1
    err = worst.rel_error

    hybrid_cfg, twin_cfg = model_pair(plan)
    task = MQAR(vocab_size=plan.vocab, num_kv_pairs=plan.num_kv_pairs)
    if getattr(args, "steps", None):
        plan = DemoPlan(**{**plan.__dict__, "steps": args.steps})
    elif device.type == "cpu":
        # same step count for both models, as many as fit the time budget on this (possibly busy) machine
        t_h, t_t = (seconds_per_step(c, plan, task, device) for c in (hybrid_cfg, twin_cfg))
        budget = float(getattr(args, "budget_s", None) or DEFAULT_CPU_TRAIN_BUDGET_S)
        steps = int(min(plan.steps, max(50, budget / (1.15 * (t_h + t_t)))))  # 1.15: optimizer + logging
        print(f"      timing: hybrid {t_h:.2f} s/step, all-MLA {t_t:.2f} s/step -> {steps} steps each "
              f"(training budget {budget:.0f}s)", flush=True)
        plan = DemoPlan(**{**plan.__dict__, "steps": steps})
    print(f"[2/4] MQAR: vocab {plan.vocab}, {plan.num_kv_pairs} key-value pairs, trained at length "
          f"{plan.train_len}, {plan.steps} steps x {plan.batch_size} sequences, lr {plan.lr}", flush=True)
    rows, curves = {}, {}
    for name, cfg in (("hybrid 3:1", hybrid_cfg), ("all-MLA", twin_cfg)):
        torch.manual_seed(0)
        model = KimiLinearForCausalLM(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"      {name}: layers {cfg.schedule_string()}, {n_params / 1e3:.1f}K parameters", flush=True)
        tcfg = TrainConfig(steps=plan.steps, batch_size=plan.batch_size, seq_len=plan.train_len, lr=plan.lr,
                           warmup_steps=max(1, plan.steps // 20), log_every=max(1, plan.steps // 60),
                           weight_decay=0.1, seed=0, progress=True, progress_desc=f"      {name}")
        trainer = Trainer(model, task, tcfg, dist_info=None)
        t0 = time.perf_counter()
        hist = trainer.train()
        train_s = time.perf_counter() - t0
        model = trainer.model
        logged = [r for r in hist if "tok_per_s" in r]
        curves[name] = ([r["step"] for r in logged], [r["loss"] for r in logged])
        acc = accuracy_by_length(model, task, plan.eval_lengths, num_examples=plan.eval_examples,
                                 batch_size=16 if device.type == "cpu" else 64)
        tok_s = decode_tokens_per_s(model, plan.decode_context, plan.decode_tokens, device)
        cache0 = predict_cache_bytes(cfg, 1, 0)["total"]
        cache128k = predict_cache_bytes(cfg, 1, CONTEXT_128K)["total"]
        rows[name] = {"config": cfg, "params": n_params, "accuracy": acc, "train_s": train_s,
                      "final_loss": logged[-1]["loss"], "decode_tok_s": tok_s,
                      "cache_bytes_per_token": (cache128k - cache0) / CONTEXT_128K, "cache_fixed_bytes": cache0,
                      "cache_128k_bytes": cache128k}
        print(f"      {name}: trained in {train_s:.0f}s, final loss {logged[-1]['loss']:.3f}; accuracy "
              + " ".join(f"{L}:{100 * a:.0f}%" for L, a in acc.items()) + f"; decode {tok_s:.0f} tok/s", flush=True)

    print("[3/4] side by side", flush=True)
    names = list(rows)
    lines = [("", *names), ("parameters", *(f"{rows[n]['params'] / 1e3:.1f}K" for n in names)),
             ("layers", *(rows[n]["config"].schedule_string() for n in names))]
    for L in plan.eval_lengths:
        lines.append((f"MQAR accuracy @ {L}", *(f"{100 * rows[n]['accuracy'][L]:.1f}%" for n in names)))
    lines += [("final train loss", *(f"{rows[n]['final_loss']:.3f}" for n in names)),
              ("KV cache bytes / token (bf16)", *(f"{rows[n]['cache_bytes_per_token']:.0f}" for n in names)),
              ("fixed state bytes (KDA, fp32)", *(_fmt_bytes(rows[n]["cache_fixed_bytes"]) for n in names)),
              ("cache at 128K context", *(_fmt_bytes(rows[n]["cache_128k_bytes"]) for n in names)),
              (f"decode tok/s (batch 1, ctx {plan.decode_context})",
               *(f"{rows[n]['decode_tok_s']:.0f}" for n in names)),
              ("train time", *(f"{rows[n]['train_s']:.0f}s" for n in names))]
    w0 = max(len(r[0]) for r in lines)
    w = [max(len(r[i]) for r in lines) for i in range(1, len(names) + 1)]
    table = "\n".join(f"  {r[0]:<{w0}}  " + "  ".join(f"{c:>{w[i]}}" for i, c in enumerate(r[1:])) for r in lines)
    print(table)
    h, t = rows[names[0]], rows[names[1]]
    print(f"  hybrid cache at 128K is {h['cache_128k_bytes'] / t['cache_128k_bytes']:.0%} of the twin's; parameter "
          f"counts differ by {abs(h['params'] - t['params']) / t['params']:.1%}.")
    print("  Caveats: one seed, small models, same steps (not same wall time). Kimi Linear's MLA is NoPE: the all-MLA\n"
          "  twin has no positional signal or short convolution and must infer token order from the causal mask,\n"
          "  which makes MQAR's copy-the-next-token step slow to learn at this size; rerun with --steps N for longer\n"
          "  training. Decode speed of models this small measures per-op overhead, not memory bandwidth.")

    write_png(out / "demo.png", rows, plan, curves)
    summary = {n: {k: v for k, v in r.items() if k != "config"} | {"layers": r["config"].schedule_string()}
               for n, r in rows.items()}
    (out / "demo.json").write_text(json.dumps({"device": str(device), "plan": plan.__dict__, "kda_self_check": err,
                                               "models": summary}, indent=1, default=str))
    elapsed = time.perf_counter() - t_start
    print(f"[4/4] wrote {out / 'demo.png'} and {out / 'demo.json'}; demo took {elapsed:.0f}s "
          f"({elapsed / 60:.1f} min)", flush=True)
    return 0 if all(math.isfinite(r["final_loss"]) for r in rows.values()) else 1
