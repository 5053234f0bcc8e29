"""Training checkpoints: model, optimizer, RNG and loop state in safetensors plus one small JSON (no pickle).

Layout of a checkpoint directory::

    model.safetensors        model weights (tied weights stored once)
    config.json              the model config, when the model has one (``config.to_json``)
    optimizer.safetensors    AdamW moments and step per parameter, keyed ``<param name>.<state>``
    rng.safetensors          torch CPU/CUDA generator states, numpy MT19937 key, Python MT state
    trainer_state.json       step, tokens seen, optimizer hyper-parameters, train config, RNG scalars

Data position needs no state of its own: batches are a pure function of (seed, step).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Write ``model``'s state dict as safetensors (shared tensors are written once)."""
    save_model(model, str(path))


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``model``, naming every missing, unexpected or mis-shaped tensor."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"only .safetensors weights are loaded (no pickle), got {path}")
    tensors = load_file(str(path))
    own = model.state_dict()
    # a tied weight is stored once under one of its names; the other names alias the same storage
    ptr_to_names: dict[int, list[str]] = {}
    for name, t in own.items():
        ptr_to_names.setdefault(t.data_ptr(), []).append(name)
    missing = [n for n in own if n not in tensors
               and not any(alias in tensors for alias in ptr_to_names[own[n].data_ptr()])]
    unexpected = [n for n in tensors if n not in own]
    misshaped = [f"{n}: file {tuple(tensors[n].shape)} vs model {tuple(own[n].shape)}"
                 for n in tensors if n in own and tensors[n].shape != own[n].shape]
    if missing or unexpected or misshaped:
        raise ValueError(f"checkpoint {path} does not match the model: missing={missing} "
                         f"unexpected={unexpected} misshaped={misshaped}")
    with torch.no_grad():
        for name, t in tensors.items():
            for alias in ptr_to_names[own[name].data_ptr()]:
                own[alias].copy_(t)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict:
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{names[p]}.{key}"] = t.detach().cpu().contiguous()
    return out


def _load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                            tensors: dict[str, torch.Tensor]) -> None:
    by_name = {n: p for p, n in names.items()}
    optimizer.state.clear()
    for key, t in tensors.items():
        pname, _, field = key.rpartition(".")
        if pname not in by_name:
            raise ValueError(f"optimizer state names an unknown parameter {pname!r}")
        p = by_name[pname]
        # AdamW keeps `step` as a CPU scalar unless fused/capturable; moments live with the parameter
        dev = p.device if t.ndim > 0 or optimizer.defaults.get("fused") or optimizer.defaults.get("capturable") \
            else torch.device("cpu")
        optimizer.state[p][field] = t.to(dev)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and p not in optimizer.state and tensors:
                raise ValueError(f"optimizer state is missing for parameter {names[p]!r}")


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, key, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (the global legacy RNG is what we save)
    tensors["numpy_key"] = torch.from_numpy(np.asarray(key, dtype=np.uint32).astype(np.int64))
    version, internal, gauss = random.getstate()
    tensors["python_state"] = torch.tensor(internal, dtype=torch.int64)
    scalars = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, gauss]}
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    version, gauss = scalars["python"]
    random.setstate((version, tuple(int(x) for x in tensors["python_state"].tolist()), gauss))


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    names: dict[torch.nn.Parameter, str], state: dict[str, Any], *, rank: int = 0,
                    model_tensors: dict[str, torch.Tensor] | None = None,
                    optim_tensors: dict[str, torch.Tensor] | None = None,
                    model_metadata: dict[str, str] | None = None) -> None:
    """Write a checkpoint directory. ``state`` is JSON-serialisable loop state (step, configs...).
    With several processes every rank writes its own RNG file; rank 0 writes the rest.

    ``model_tensors`` / ``optim_tensors`` (rank 0): full tensors gathered from a sharded (FSDP) model, written
    instead of ``model`` / ``optimizer``'s own local tensors, in the same format."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng_tensors, rng_scalars = rng_state()
    save_file(rng_tensors, str(path / (RNG_FILE if rank == 0 else f"rng_rank{rank}.safetensors")))
    if rank != 0:
        return
    if model_tensors is None:
        save_weights(model, path / MODEL_FILE)
    else:
        save_file(model_tensors, str(path / MODEL_FILE), metadata=model_metadata)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json"):
        (path / "config.json").write_text(cfg.to_json() if callable(cfg.to_json) else str(cfg.to_json))
    save_file(_optimizer_tensors(optimizer, names) if optim_tensors is None else optim_tensors,
              str(path / OPTIM_FILE))
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[p] for p in g["params"]]}
              for g in optimizer.param_groups]
    payload = dict(state, optimizer_param_groups=groups, rng=rng_scalars)
    tmp = path / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path / STATE_FILE)  # trainer_state.json appears last: its presence marks a complete checkpoint



def check_param_groups(optimizer: torch.optim.Optimizer, names: dict, saved_groups: list[dict]) -> None:
    """The optimizer's parameter groups must hold the checkpoint's parameters, in its order."""
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"optimizer has {len(optimizer.param_groups)} param groups, checkpoint {len(saved_groups)}")
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        if [names[p] for p in group["params"]] != saved["params"]:
            raise ValueError("optimizer param groups hold different parameters than the checkpoint")

def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    names: dict[torch.nn.Parameter, str], *, rank: int = 0) -> dict[str, Any]:
    """Restore model, optimizer and RNG from ``path``; returns the JSON loop state."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"no complete checkpoint in {path} ({STATE_FILE} missing)")
    state = json.loads((path / STATE_FILE).read_text())
    load_weights(model, path / MODEL_FILE)
    _load_optimizer_tensors(optimizer, names, load_file(str(path / OPTIM_FILE)))
    saved_groups = state["optimizer_param_groups"]
    check_param_groups(optimizer, names, saved_groups)
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        for k, v in saved.items():
            if k != "params":
                group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
    rng_file = path / (RNG_FILE if rank == 0 else f"rng_rank{rank}.safetensors")
    if not rng_file.exists():
        rng_file = path / RNG_FILE
    set_rng_state(load_file(str(rng_file)), state["rng"])
    return state
