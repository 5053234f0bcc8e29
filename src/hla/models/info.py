"""``hla info``: parameter counts, layer schedule, weight and cache bytes of any config."""

from __future__ import annotations

import os

import torch

from hla.models.config import KimiLinearConfig

CONTEXTS = (("4K", 4096), ("128K", 131072), ("1M", 1048576))


def resolve_config(spec: str) -> KimiLinearConfig:
    """A preset name, a ``config.json`` file or a checkpoint directory."""
    if os.path.exists(spec):
        return KimiLinearConfig.from_json(spec)
    try:
        return KimiLinearConfig.preset(spec)
    except ValueError:
        raise ValueError(f"CONFIG_OR_DIR: {spec!r} is neither a path nor a preset name") from None


def weight_bytes(config: KimiLinearConfig, dtype: torch.dtype) -> int:
    """Bytes of the weights in ``dtype``, with the fp32-kept tensors (KDA gate, router) at 4 bytes."""
    from hla.models.kimi_linear import KimiLinearForCausalLM

    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    model.to_dtype(dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def model_info(config: KimiLinearConfig, dtype: torch.dtype | None = None) -> str:
    """A human-readable report (see ``hla info --help``)."""
    from hla.generation.cache import predict_cache_bytes

    if dtype is None:
        dtype = {"float32": torch.float32, "float16": torch.float16}.get(config.dtype, torch.bfloat16)
    counts = config.parameter_counts()
    lines = [
        f"parameters        {counts['total']:,} ({counts['total'] / 1e9:.2f} B)",
        f"active per token  {counts['active']:,} ({counts['active'] / 1e9:.2f} B)",
        f"layers            {config.num_hidden_layers}: {config.num_kda_layers} KDA + {config.num_mla_layers} MLA, "
        f"{config.num_moe_layers} MoE + {config.num_dense_layers} dense FFN",
        f"schedule          {config.schedule_string()}  (MLA at 0-based {config.mla_layers})",
        f"weights           {_fmt_bytes(weight_bytes(config, dtype))} in {str(dtype).replace('torch.', '')} "
        "(KDA gate and router in fp32)",
    ]
    twin = config.with_schedule("all_mla")
    for label, cfg in (("this model", config), ("all-MLA twin", twin)):
        one = predict_cache_bytes(cfg, 1, 1, dtype)
        fixed = one["kda_state"] + one["kda_conv"]
        lines.append(f"cache ({label}, batch 1, {str(dtype).replace('torch.', '')}): "
                     f"{_fmt_bytes(one['mla_latent'])} per token + {_fmt_bytes(fixed)} fixed KDA state")
        totals = [(name, predict_cache_bytes(cfg, 1, n, dtype)["total"]) for name, n in CONTEXTS]
        row = "  ".join(f"{name}: {_fmt_bytes(b)} ({b / 1e9:.2f} GB)" for name, b in totals)
        lines.append(f"    {row}")
    return "\n".join(lines)
