"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer: sharding plan and full-state-dict checkpoint I/O.

Every decoder block is one FSDP group (parameters all-gathered just before its forward and backward,
gradients reduce-scattered after), the root group holds the embedding, final norm and LM head. Nothing here
moves tensors by hand: fully_shard and ``torch.distributed.checkpoint.state_dict`` do all communication.

Mixed precision on GPU: parameters are all-gathered in bf16 and gradients reduced in fp32 (the sharded
master weights and AdamW state stay fp32). Modules that declare ``fp32_params`` (KDA with its ``A_log`` /
``dt_bias`` gate, the MoE router) are their own group with fp32 parameters, since one policy applies to a
whole group; their matmuls still run in bf16 under the trainer's autocast, exactly as with DDP.

Checkpoints are the single-process format (see :mod:`hla.training.checkpoint`): full, unsharded tensors
gathered to rank 0 on save, read by rank 0 and broadcast into the shards on load, so FSDP and
single-process/DDP runs resume from each other's checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

PARALLEL_MODES = ("ddp", "fsdp")


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"FSDP sharding needs a model with .model.layers (a ModuleList of decoder blocks); "
                         f"{type(model).__name__} has none")
    return list(layers)


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Apply fully_shard in place: fp32-parameter modules, then each decoder block, then the root.

    Must run after the model is on ``device`` and before the optimizer is built (fully_shard replaces the
    parameters with sharded DTensor parameters under the same names). Returns the same module object."""
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        mp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    else:  # the CPU trains in fp32 throughout
        mp = mp32 = MixedPrecisionPolicy()
    for block in _blocks(model):
        # outermost modules with fp32_params only (a short conv inside KDA is covered by KDA's group)
        done: list[str] = []
        for name, m in block.named_modules():
            if getattr(m, "fp32_params", ()) and m is not block and not any(name.startswith(d + ".") for d in done):
                done.append(name)
                fully_shard(m, mp_policy=mp32)
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def _alias_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied embeddings), sorted; groups of one are left out."""
    by_param: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(n)
    return [sorted(g) for g in by_param.values() if len(g) > 1]


def gather_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded CPU state dict on rank 0 ({} elsewhere). Collective: every rank must call it.

    A tied weight is kept under its alphabetically first name, as ``safetensors.torch.save_model`` does, so
    the file is the one a single-process run writes."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for group in _alias_groups(model):
        for alias in group[1:]:
            sd.pop(alias, None)
    return {k: v.contiguous() for k, v in sd.items()}


def gather_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state as ``{"<param name>.<field>": tensor}`` (full, on CPU) on rank 0, {} elsewhere. Collective."""
    osd = get_optimizer_state_dict(model, optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = {}
    for pname, state in osd.get("state", {}).items():
        for field, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{pname}.{field}"] = t.detach().cpu().contiguous()
    return out


def check_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Any) -> None:
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor (shapes of the full model)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # DTensor shapes are the global shapes
    aliases = {n: g for g in _alias_groups(model) for n in g}
    missing = [n for n in own if n not in tensors and not any(a in tensors for a in aliases.get(n, ()))]
    unexpected = [n for n in tensors if n not in own]
    misshaped = [f"{n}: file {tuple(tensors[n].shape)} vs model {own[n]}"
                 for n in tensors if n in own and tuple(tensors[n].shape) != own[n]]
    if missing or unexpected or misshaped:
        raise ValueError(f"checkpoint {source} does not match the model: missing={missing} "
                         f"unexpected={unexpected} misshaped={misshaped}")


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None) -> None:
    """Load a full state dict into the sharded model. ``tensors``: the checkpoint's tensors on rank 0
    (checked by the caller), ignored elsewhere; rank 0 broadcasts them. Collective."""
    full = dict(tensors or {})
    if full:
        for group in _alias_groups(model):
            src = next(n for n in group if n in full)
            for alias in group:
                full[alias] = full[src]
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         tensors: dict[str, torch.Tensor] | None, param_groups: list[dict[str, Any]]) -> None:
    """Load ``{"<param name>.<field>": tensor}`` (rank 0; ignored elsewhere) and the saved param groups
    (hyper-parameters, params as names) into the sharded optimizer. Collective."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in (tensors or {}).items():
        pname, _, field = key.rpartition(".")
        state.setdefault(pname, {})[field] = t
    groups = []
    for g, live in zip(param_groups, optimizer.param_groups, strict=True):
        groups.append({k: (tuple(v) if isinstance(live.get(k), tuple) else v) for k, v in g.items()})
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _file_shapes(path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def save_checkpoint_fsdp(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         names: dict[torch.nn.Parameter, str], state: dict[str, Any], *, rank: int) -> None:
    """Gather full model and optimizer state to rank 0 and write the usual checkpoint directory. Collective."""
    from hla.training import checkpoint as ckpt

    model_tensors = gather_model_state(model)
    optim_tensors = gather_optimizer_state(model, optimizer)
    tied = {a: g[0] for g in _alias_groups(model) for a in g[1:]}  # what save_model records for dropped aliases
    ckpt.save_checkpoint(path, model, optimizer, names, state, rank=rank, model_tensors=model_tensors,
                         optim_tensors=optim_tensors, model_metadata=tied or None)


def load_checkpoint_fsdp(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         names: dict[torch.nn.Parameter, str], *, rank: int) -> dict[str, Any]:
    """Restore a (single-process, DDP or FSDP) checkpoint into a sharded model and its optimizer. Collective.

    Every rank reads the JSON and the safetensors headers and validates them (so a bad checkpoint raises on
    all ranks instead of leaving some waiting in a broadcast); rank 0 alone reads the tensors."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from hla.training import checkpoint as ckpt

    path = Path(path)
    if not (path / ckpt.STATE_FILE).exists():
        raise FileNotFoundError(f"no complete checkpoint in {path} ({ckpt.STATE_FILE} missing)")
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    shapes = _file_shapes(path / ckpt.MODEL_FILE)
    check_model_tensors(model, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, path / ckpt.MODEL_FILE)
    saved_groups = state["optimizer_param_groups"]
    ckpt.check_param_groups(optimizer, names, saved_groups)
    known = set(names.values())
    unknown = sorted({k.rpartition(".")[0] for k in _file_shapes(path / ckpt.OPTIM_FILE)} - known)
    if unknown:
        raise ValueError(f"optimizer state names unknown parameters {unknown}")

    load_model_state(model, load_file(str(path / ckpt.MODEL_FILE)) if rank == 0 else None)
    load_optimizer_state(model, optimizer, load_file(str(path / ckpt.OPTIM_FILE)) if rank == 0 else None,
                         saved_groups)
    rng_file = path / (ckpt.RNG_FILE if rank == 0 else f"rng_rank{rank}.safetensors")
    if not rng_file.exists():
        rng_file = path / ckpt.RNG_FILE
    ckpt.set_rng_state(load_file(str(rng_file)), state["rng"])
    return state
