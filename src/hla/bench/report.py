"""The Markdown tables and PNG plots of an ``hla bench`` run (from its results dict / JSON)."""

from __future__ import annotations

import os

from hla.bench.claims import MODELS, PAPER_PREFILL, PAPER_THROUGHPUT, PAPER_TPOT, fmt_length

_LABEL = {"hybrid": "hybrid (KDA+MLA)", "all_mla": "all-MLA"}


def _gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.3f}"


def _x(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}x"


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render_markdown(results: dict) -> str:
    """A self-contained Markdown section: card, date, command, the tables, the comparison with the paper."""
    meta, summ = results["meta"], results.get("summary", {})
    n_mla = meta["num_mla_layers"]
    n_layers = len(meta["schedules"]["hybrid"])
    bw = meta.get("copy_bandwidth")
    lines = [
        f"## Kimi Linear vs all-MLA: cache, decode and prefill (`{meta['config']}`)",
        "",
        f"Card: **{meta['card']}**; date {meta['date']}; torch {meta['torch']}; dtype {meta['dtype']}; "
        f"random weights.",
        f"Command: `{meta['command']}`",
        "",
        f"Config `{meta['config']}`: {_params(meta['params']['hybrid'])} parameters "
        f"({_params(meta['active_params']['hybrid'])} active), {n_layers} layers, schedule "
        f"`{meta['schedules']['hybrid']}` ({n_mla['hybrid']} MLA); twin: every layer MLA "
        f"({_params(meta['params']['all_mla'])} parameters, same widths and FFNs).",
        f"Decode: {meta['cache_fill']}. Prefill: {meta['prefill_method']}.",
    ]
    if bw:
        lines.append(f"Measured device copy bandwidth {bw / 1e12:.2f} TB/s; 'floor' = bytes a step must read "
                     "(weights without the embedding table + cache) / that bandwidth.")
    lines.append("")

    if results["cache"]:
        lines += ["### Cache bytes vs context (batch 1, GB = 1e9 bytes)", "",
                  _row(["context", "hybrid predicted", "hybrid measured", "all-MLA predicted", "all-MLA measured",
                        "KV (latent) reduction", "total reduction"]),
                  _row(["---"] * 7)]
        for r in results["cache"]:
            cells = [fmt_length(r["context"])]
            for m in MODELS:
                cells.append(_gb(r[m]["predicted"]["total"]))
                cells.append(_gb(r[m]["measured"]) if r[m]["measured"] is not None else r[m]["note"])
            cells += [f"{r['kv_reduction_pct']:.2f}%" if r["kv_reduction_pct"] is not None else "-",
                      f"{r['total_reduction_pct']:.2f}%"]
            lines.append(_row(cells))
        eq = summ.get("cache_measured_equals_predicted")
        lines += ["", f"Measured bytes equal the prediction in {summ.get('cache_allocations_checked', 0)} "
                  f"allocations: {'yes' if eq else ('no' if eq is False else 'not checked')}. "
                  "The KV reduction counts the MLA latents only (the paper's 'KV cache'); the total adds the "
                  "hybrid's fixed-size KDA states and conv windows, which the all-MLA model does not have, so it "
                  "approaches the latent ratio only at long contexts.", ""]

    if results["tpot"]:
        by = {(r["context"], r["model"]): r for r in results["tpot"]}
        ctxs = sorted({r["context"] for r in results["tpot"]})
        lines += ["### Time per output token, batch 1", "",
                  _row(["context", "hybrid ms", "all-MLA ms", "speedup", "paper", "hybrid floor ms",
                        "all-MLA floor ms", "mode"]), _row(["---"] * 8)]
        for c in ctxs:
            h, m = by.get((c, "hybrid")), by.get((c, "all_mla"))
            sp = m["ms"] / h["ms"] if h and m else None
            modes = sorted({r["mode"] for r in (h, m) if r})
            lines.append(_row([fmt_length(c), _num(h and h["ms"]), _num(m and m["ms"]), _x(sp),
                               _x(PAPER_TPOT.get(c), 1), _num(h and h.get("floor_ms")), _num(m and m.get("floor_ms")),
                               "/".join(modes)]))
        lines.append("")

    if results["throughput"] or results.get("max_batch_predicted"):
        by = {(r["context"], r["model"]): r for r in results["throughput"]}
        pred = {r["context"]: r for r in results.get("max_batch_predicted", [])}
        ctxs = sorted(set(pred) | {r["context"] for r in results["throughput"]})
        lines += ["### Throughput at the largest batch that fits", "",
                  f"Batch predicted from the free memory ({meta['memory_free_at_start'] / 2**30:.1f} GiB at start), "
                  f"the weights, the cache bytes per sequence and a {meta['memory_margin'] / 2**30:.1f} GiB margin "
                  f"(capped at {meta['max_batch_cap']}), then verified by allocating it and running decode steps "
                  "(run = the batch that ran; '-' = not measured).", "",
                  _row(["context", "hybrid batch (pred / run)", "hybrid tok/s", "all-MLA batch (pred / run)",
                        "all-MLA tok/s", "speedup", "paper", "ms/token hybrid", "ms/token all-MLA"]),
                  _row(["---"] * 9)]
        for c in ctxs:
            cells = [fmt_length(c)]
            rows = {}
            for m in MODELS:
                r = by.get((c, m))
                rows[m] = r
                p = pred.get(c, {}).get(m, "-")
                cells += [f"{p} / {r['batch'] if r else '-'}", _num(r and r["tokens_per_s"], ".1f")]
            sp = (rows["hybrid"]["tokens_per_s"] / rows["all_mla"]["tokens_per_s"]
                  if rows["hybrid"] and rows["all_mla"] else None)
            cells += [_x(sp), _x(PAPER_THROUGHPUT.get(c), 1),
                      _num(rows["hybrid"] and rows["hybrid"]["ms_per_token"]),
                      _num(rows["all_mla"] and rows["all_mla"]["ms_per_token"])]
            lines.append(_row(cells))
        lines.append("")

    pf = results["prefill"]
    if pf["hybrid"] or pf["all_mla"]:
        hs = {r["length"]: r["s"] for r in pf["hybrid"]}
        ms = {r["length"]: r["s"] for r in pf["all_mla"]}
        lines += ["### Prefill time vs length (batch 1)", "",
                  _row(["length", "hybrid s", "all-MLA s", "speedup", "paper", "measured?"]), _row(["---"] * 6)]
        for n in sorted(set(hs) | set(ms)):
            sp = ms[n] / hs[n] if n in hs and n in ms else None
            lines.append(_row([fmt_length(n), _num(hs.get(n)), _num(ms.get(n)), _x(sp), _x(PAPER_PREFILL.get(n), 1),
                               "measured"]))
        for e in pf.get("extrapolated", []):
            h, m = e.get("hybrid_s"), e.get("all_mla_s")
            lines.append(_row([fmt_length(e["length"]), _num(h), _num(m), _x(m / h if h and m else None),
                               _x(PAPER_PREFILL.get(e["length"]), 1), "**extrapolated**"]))
        ex = pf.get("exponent", {})
        parts = []
        for m in MODELS:
            e = ex.get(m, {})
            parts.append(f"{_LABEL[m]} {_num(e.get('all'), '.2f')} over all points, "
                         f"{_num(e.get('from_16k'), '.2f')} from 16K, {_num(e.get('last_two'), '.2f')} between the "
                         "last two")
        lines += ["", "Scaling exponent of time vs length (log-log slope): " + "; ".join(parts) + ". "
                  "Extrapolated rows continue the last two points' slope (this errs low for all-MLA, whose "
                  "quadratic share keeps growing).", ""]

    bd = results.get("breakdown", {})
    if bd:
        c = next(iter(bd.values()))["context"]
        lines += [f"### Where a decode step goes (batch 1, context {fmt_length(c)}, ms)", "",
                  "Each layer's mixer and FFN timed alone (one CUDA graph each on the GPU); 'rest' = full step "
                  "minus the parts (embedding, norms, residual adds, LM head, and the gaps between kernels).", "",
                  _row(["part", "hybrid", "all-MLA"]), _row(["---"] * 3)]

        def cell(m: str, key: str, count: str | None = None) -> str:
            r = bd.get(m)
            if not r:
                return "-"
            n = f" ({r[count]} layers)" if count else ""
            return f"{r[key]:.3f}{n}"

        nffn = {m: (r["num_moe"], len(r["layers"]) - r["num_moe"]) for m, r in bd.items()}
        lines += [
            _row(["KDA mixer", cell("hybrid", "kda_mixer_ms", "num_kda"), cell("all_mla", "kda_mixer_ms", "num_kda")]),
            _row(["MLA attention", cell("hybrid", "mla_attention_ms", "num_mla"),
                  cell("all_mla", "mla_attention_ms", "num_mla")]),
            _row(["MoE", cell("hybrid", "moe_ms"), cell("all_mla", "moe_ms")]),
            _row(["dense MLP", cell("hybrid", "mlp_ms"), cell("all_mla", "mlp_ms")]),
            _row(["rest", cell("hybrid", "rest_ms"), cell("all_mla", "rest_ms")]),
            _row(["**step**", cell("hybrid", "step_ms"), cell("all_mla", "step_ms")]),
            "",
        ]
        if nffn:
            lines.append("FFN layers (MoE, dense): " + ", ".join(f"{_LABEL[m]} {a}, {b}" for m, (a, b) in nffn.items())
                         + ". Modes: " + ", ".join(f"{_LABEL[m]} {r['mode']}" for m, r in bd.items()) + ".")
            lines.append("")

    lines += ["### Against the paper (Kimi Linear technical report, 48B hybrid vs all-MLA)", ""]
    t = summ.get("tpot_speedup")
    if t:
        lines.append(f"- TPOT at batch 1, {fmt_length(t['context'])} context: hybrid {t['hybrid_ms']:.3f} ms vs "
                     f"all-MLA {t['all_mla_ms']:.3f} ms = **{t['ours']:.2f}x** (paper: "
                     f"{_x(t['paper'], 1) + ' at this context, ' if t['paper'] else ''}"
                     f"{t['paper_at_1m']:.1f}x at 1M).")
    else:
        lines.append("- TPOT at batch 1: not measured for both models.")
    t = summ.get("throughput_speedup")
    if t:
        lines.append(f"- Throughput with the largest batch that fits, {fmt_length(t['context'])} context: hybrid batch "
                     f"{t['hybrid_batch']} at {t['hybrid_tokens_per_s']:.1f} tok/s vs all-MLA batch "
                     f"{t['all_mla_batch']} at {t['all_mla_tokens_per_s']:.1f} tok/s = **{t['ours']:.2f}x** (paper: "
                     f"{_x(t['paper'], 1) + ' at this context, ' if t['paper'] else ''}{t['paper_at_1m']:.1f}x at 1M).")
        b = summ.get("throughput_speedup_best")
        if b:
            lines.append(f"- Best measured rate of each model at {fmt_length(b['context'])} (the largest batch or "
                         f"batch 1, whichever is faster): hybrid {b['hybrid_tokens_per_s']:.1f} tok/s vs all-MLA "
                         f"{b['all_mla_tokens_per_s']:.1f} tok/s = **{b['ours']:.2f}x**.")
    else:
        lines.append("- Throughput at the largest batch: not measured for both models.")
    if "cache_kv_reduction_min_pct" in summ:
        tot = summ["cache_total_reduction_pct"]
        longest = max(tot, key=int)
        lines.append(f"- Cache: the KV (latent) cache is {summ['cache_kv_reduction_min_pct']:.2f}% smaller at every "
                     f"context (paper: 74-75%); including the KDA states the total is {tot[longest]:.2f}% smaller at "
                     f"{fmt_length(int(longest))}.")
    t = summ.get("prefill_speedup")
    if t:
        lines.append(f"- Prefill at {fmt_length(t['length'])} (longest measured): **{t['ours']:.2f}x**"
                     f"{' (paper ' + _x(t['paper'], 1) + ')' if t['paper'] else ''}"
                     + (f"; at 1M **extrapolated** {summ['prefill_speedup_1m_extrapolated']['ours']:.2f}x (paper 2.9x)"
                        if "prefill_speedup_1m_extrapolated" in summ else "") + ".")
    if meta.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(meta["skipped"]) + "."]
    lines.append("")
    return "\n".join(lines)


def save_plots(results: dict, out_dir: str, stem: str) -> list[str]:
    """Three small PNGs (TPOT, throughput, cache bytes vs context; both models on each); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    title_tail = f"{meta['config']}, {meta['card']}"
    series = {
        "tpot": ("time per output token, batch 1 (ms)", results["tpot"], "ms"),
        "throughput": ("decode throughput at max batch (tokens/s)", results["throughput"], "tokens_per_s"),
    }
    paths = []

    def plot(name: str, ylabel: str, data: dict) -> None:
        fig, ax = plt.subplots(figsize=(5.0, 3.4), dpi=90)
        for m, pts in data.items():
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker="o", label=_LABEL[m])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title_tail, fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        prefix = "" if stem == "claims" else f"{stem}-"
        path = os.path.join(out_dir, f"{prefix}{name}_vs_context.png")
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)

    for name, (ylabel, rows, key) in series.items():
        data = {m: [(r["context"], r[key]) for r in rows if r["model"] == m and r.get(key)] for m in MODELS}
        if any(data.values()):
            plot(name, ylabel, data)
    if results["cache"]:
        data = {m: [(r["context"], r[m]["predicted"]["total"] / 1e9) for r in results["cache"]] for m in MODELS}
        plot("cache", "cache bytes, batch 1 (GB, predicted = measured)", data)
    return paths
