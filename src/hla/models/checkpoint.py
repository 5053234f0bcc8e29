"""Checkpoint I/O in the release format: ``config.json`` + safetensors shards + index.

One name table (``checkpoint_name_table``) maps every release tensor name to a module parameter
(and, for routed experts, which are stored stacked ``[E, ...]`` in hla, the expert index).
Everything else — loading, saving, error reports — goes through it.

Loading builds the model on the meta device, allocates it once (``to_empty``) in the target
dtype and device, then copies tensors in shard by shard from memory-mapped safetensors files, so
peak host memory stays near one copy of the weights plus one tensor. Pickle-based formats
(``.bin``, ``.pt``...) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections import OrderedDict

import torch

from hla.models.config import KimiLinearConfig
from hla.models.kimi_linear import KimiLinearForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_EXPERT_PARAMS = ("w1", "w2", "w3")
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def checkpoint_name_table(model: KimiLinearForCausalLM) -> OrderedDict:
    """``release name -> (parameter name, expert index or None)`` for every tensor of a checkpoint.

    Module names already equal the release names except the stacked routed experts:
    ``...block_sparse_moe.experts.w1 [E, I, d]`` <-> ``...block_sparse_moe.experts.{e}.w1.weight``.
    A tied LM head appears once (``model.embed_tokens.weight``).
    """
    table = OrderedDict()
    for name, p in model.named_parameters():
        head, _, leaf = name.rpartition(".")
        if head.endswith("block_sparse_moe.experts") and leaf in _EXPERT_PARAMS:
            for e in range(p.shape[0]):
                table[f"{head}.{e}.{leaf}.weight"] = (name, e)
        else:
            table[name] = (name, None)
    return table


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float32": torch.float32, "fp32": torch.float32, "float64": torch.float64}
    key = str(dtype).replace("torch.", "")
    if key not in names:
        raise ValueError(f"dtype: expected one of {sorted(names)} or a torch.dtype, got {dtype!r}")
    return names[key]


def _checkpoint_files(path: str) -> list[str]:
    """Safetensors files of a checkpoint directory (or a single file), refusing pickle formats."""
    if os.path.isfile(path):
        if path.endswith(PICKLE_SUFFIXES):
            raise ValueError(f"{path}: pickle-based checkpoints are refused (they can run code); use safetensors")
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path}: expected a .safetensors file or a checkpoint directory")
        return [path]
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ValueError(f"{path}: only pickle-based weights {pickles}; they are refused (they can run code). "
                             "Convert them to safetensors.")
        raise FileNotFoundError(f"{path}: no .safetensors files")
    return [os.path.join(path, f) for f in files]


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file (``name -> {dtype, shape, data_offsets}``) and where data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class _MappedShard:
    """Zero-copy tensor views into a memory-mapped safetensors file.

    Copying from these views into the model's own storage needs no intermediate tensor, and the
    file pages each copy touched are released right after (``MADV_DONTNEED``), so loading holds
    one copy of the weights plus at most one tensor's worth of mapped pages.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.header, self.base = read_safetensors_header(path)
        self._file = open(path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None

    def copy_into(self, key: str, dst: torch.Tensor) -> None:
        info = self.header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = (self.base + o for o in info["data_offsets"])
        dtype = _ST_DTYPES[info["dtype"]]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if end - start != numel * torch.empty(0, dtype=dtype).element_size():
            raise ValueError(f"{self.path}: tensor {key} has {end - start} bytes for shape {info['shape']}")
        if numel == 0:
            return
        with warnings.catch_warnings():  # the view is read-only; we only read from it
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(self._mm, dtype=dtype, count=numel, offset=start)
        dst.copy_(view.view(info["shape"]))
        del view
        if hasattr(mmap, "MADV_DONTNEED"):
            page = mmap.PAGESIZE
            lo = start - start % page
            self._mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still referenced somewhere; the GC will unmap it
                pass
        self._file.close()


def _expected_shape(model_params: dict, param_name: str, expert: int | None) -> tuple:
    shape = tuple(model_params[param_name].shape)
    return shape[1:] if expert is not None else shape


def load_state_into(model: KimiLinearForCausalLM, files: list[str], *, strict: bool = True) -> None:
    """Copy the tensors of safetensors ``files`` into ``model`` (already allocated), one at a time.

    Raises ValueError listing every missing, unexpected or mis-shaped tensor (with the expected and
    found shapes) before any data is read.
    """
    table = checkpoint_name_table(model)
    params = dict(model.named_parameters())
    found: dict[str, tuple[str, tuple]] = {}
    for file in files:
        for key, info in read_safetensors_header(file)[0].items():
            found[key] = (file, tuple(info["shape"]))
    unexpected = sorted(k for k in found if k not in table)
    missing = sorted(k for k in table if k not in found)
    misshaped = []
    for key, (_, shape) in found.items():
        if key in table:
            want = _expected_shape(params, *table[key])
            if shape != want:
                misshaped.append(f"{key}: expected {list(want)}, found {list(shape)}")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors: " + ", ".join(
            f"{k} (expected {list(_expected_shape(params, *table[k]))})" for k in missing[:50])
            + (" ..." if len(missing) > 50 else ""))
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensors: " + "; ".join(misshaped[:50]))
    if unexpected and strict:
        problems.append(f"unexpected {len(unexpected)} tensors: " + ", ".join(
            f"{k} {list(found[k][1])}" for k in unexpected[:50]) + (" ..." if len(unexpected) > 50 else ""))
    if problems:
        raise ValueError("checkpoint does not match the config:\n  " + "\n  ".join(problems))

    by_file: dict[str, list[str]] = {}
    for key, (file, _) in found.items():
        if key in table:
            by_file.setdefault(file, []).append(key)
    with torch.no_grad():
        for file, keys in by_file.items():
            shard = _MappedShard(file)
            try:
                for key in keys:
                    name, expert = table[key]
                    shard.copy_into(key, params[name] if expert is None else params[name][expert])
            finally:
                shard.close()


def load_model(path, *, device=None, dtype=None, strict: bool = True) -> KimiLinearForCausalLM:
    """Load a Kimi Linear checkpoint (directory with ``config.json`` and safetensors weights).

    Args:
        path: the checkpoint directory.
        device: target device (default CPU).
        dtype: target dtype for all weights but ``A_log``, ``dt_bias``, the short-conv weights, the
            router weight and the correction bias (kept fp32); default: the config's ``dtype``.
        strict: refuse tensors the model does not have.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(PICKLE_SUFFIXES):
        _checkpoint_files(path)  # raises the pickle error
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path!r} is not a checkpoint directory")
    config = KimiLinearConfig.from_json(path)
    files = _checkpoint_files(path)
    dtype = _resolve_dtype(dtype if dtype is not None else config.dtype)
    device = torch.device(device if device is not None else "cpu")
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    model.to_dtype(dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each module its own new Parameter, undoing the tie
    load_state_into(model, files, strict=strict)
    return model.eval()


def save_pretrained(model: KimiLinearForCausalLM, path, *, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write ``config.json`` and the weights under release names, sharded by size.

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json``. Old weight files in ``path`` are removed first.
    Returns the written weight file names.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    for f in os.listdir(path):
        if f == INDEX_FILE or (f.startswith("model") and f.endswith(".safetensors")):
            os.remove(os.path.join(path, f))
    dtype_name = str(model.dtype).replace("torch.", "")
    model.config.replace(dtype=dtype_name).to_json(os.path.join(path, "config.json"))

    table = checkpoint_name_table(model)
    params = dict(model.named_parameters())
    shards: list[list[str]] = [[]]
    size = 0
    for key, (name, expert) in table.items():
        p = params[name]
        nbytes = p[0].numel() * p.element_size() if expert is not None else p.numel() * p.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes

    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for keys, fname in zip(shards, names, strict=True):
        tensors = {}
        for key in keys:
            name, expert = table[key]
            t = params[name].detach()
            # An expert's slice shares storage with its neighbours; safetensors wants owned tensors.
            t = t[expert].clone() if expert is not None else t
            tensors[key] = t.contiguous().cpu()
            total += t.numel() * t.element_size()
            weight_map[key] = fname
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
