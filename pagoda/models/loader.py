"""Build a model and fill its weights: from a Hugging Face safetensors folder, or random (dummy).

`load_weights` reads ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``.
Each shard is opened with ``safe_open(..., device=<model device>)`` and each checkpoint tensor handed to
its parameter's ``weight_loader`` as a lazy slice (`CheckpointSlice`): the loader narrows it to this
rank's part, and only that part is read from the memory map and moved to the device (q/k/v and gate/up
into their fused parameters through the model's ``packed_modules_mapping``). Under tensor parallelism
no process reads, let alone holds, more than its own shards. Every checkpoint name is checked against the
model before anything is copied, so a missing or unexpected tensor is reported by name without a
half-loaded model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pagoda.models.layers import RMSNorm
from pagoda.models.registry import get_model_class

__all__ = ["build_model", "load_weights", "init_dummy_weights", "checkpoint_files", "CheckpointSlice"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers that some checkpoints carry and that pagoda recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointSlice:
    """A tensor of an open safetensors file, not read yet: ``shape``, ``dim()`` and ``narrow`` (which
    only record the range) as on a tensor; ``materialize()`` reads the selected range (safetensors'
    ``get_slice``), on the file's device. Satisfies `pagoda.models.layers.parallel.LazyTensor`."""

    def __init__(self, file_slice, shape: tuple[int, ...], ranges: tuple[tuple[int, int], ...] | None = None):
        self._slice = file_slice
        self.shape = torch.Size(shape if ranges is None else [b - a for a, b in ranges])
        self._ranges = ranges if ranges is not None else tuple((0, n) for n in shape)

    @classmethod
    def open(cls, f, name: str) -> CheckpointSlice:
        """The tensor ``name`` of the open file ``f`` (``safe_open``)."""
        sl = f.get_slice(name)
        return cls(sl, tuple(sl.get_shape()))

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> CheckpointSlice:
        if not 0 <= dim < self.dim() or start < 0 or length < 0 or start + length > self.shape[dim]:
            raise ValueError(f"narrow({dim}, {start}, {length}) is outside a tensor of shape {tuple(self.shape)}")
        ranges = list(self._ranges)
        a = ranges[dim][0] + start
        ranges[dim] = (a, a + length)
        return CheckpointSlice(self._slice, (), tuple(ranges))

    def materialize(self) -> torch.Tensor:
        return self._slice[tuple(slice(a, b) for a, b in self._ranges)]   # () for a 0-d tensor


def build_model(config, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The pagoda model of ``config.architectures[0]``, parameters allocated (not initialised) on
    ``device`` in ``dtype`` (RMSNorm weights are ones). Fill it with `load_weights` or
    `init_dummy_weights`."""
    cls = get_model_class(config)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device(device)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(saved)
    return model.eval()


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of ``model_dir``: ``model.safetensors``, else the shards of
    ``model.safetensors.index.json``. FileNotFoundError naming what is missing."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} does not exist")
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{model_dir} lacks the safetensors shard(s) {missing} listed in {INDEX_FILE}")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    raise FileNotFoundError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}"
                            + (f" (it has {found})" if found else " (no .safetensors file)"))


def _plan(model: nn.Module, files: list[Path]) -> dict[Path, list[tuple[str, str, object]]]:
    """Checkpoint name -> (parameter name, shard id) for every tensor of every file; ValueError naming
    any unexpected or missing tensor."""
    packed = getattr(model, "packed_modules_mapping", {})
    unpacked = {(new, shard): old for old, (new, shard) in packed.items()}
    params = dict(model.named_parameters())
    tied = bool(getattr(model, "tie_word_embeddings", False))
    plan, seen, unexpected = {}, set(), []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:  # header only: no tensor is read
            names = list(f.keys())
        plan[file] = []
        for name in names:
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            parts, shard = name.split("."), None
            for i, part in enumerate(parts):
                if part in packed:
                    parts[i], shard = packed[part]
                    break
            target = ".".join(parts)
            if target not in params:
                unexpected.append(name)
                continue
            plan[file].append((name, target, shard))
            seen.add((target, shard))
    if unexpected:
        raise ValueError(f"unexpected tensor(s) in the checkpoint, not in {type(model).__name__}: "
                         f"{_short(unexpected)}")
    missing = []
    for target, param in params.items():
        owner = getattr(getattr(param, "weight_loader", None), "__self__", None)
        for shard in getattr(owner, "shard_ids", (None,)):
            if (target, shard) not in seen:
                missing.append(_checkpoint_name(target, shard, unpacked))
    if missing:
        raise ValueError(f"tensor(s) missing from the checkpoint: {_short(missing)}")
    return plan


def _checkpoint_name(target: str, shard, unpacked: dict) -> str:
    if shard is None:
        return target
    parts = target.split(".")
    return ".".join(unpacked.get((p, shard), p) for p in parts)


def _short(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


@torch.no_grad()
def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Fill ``model``'s parameters from the safetensors checkpoint in ``model_dir``, shard by shard,
    each tensor memory-mapped and moved straight to the parameters' device (cast to their dtype there).

    Errors: FileNotFoundError naming a missing folder/file/shard; ValueError naming missing or
    unexpected tensors, or a tensor of the wrong shape. ``lm_head.weight`` may be absent (or is
    ignored) when the model ties its word embeddings.
    """
    files = checkpoint_files(model_dir)
    plan = _plan(model, files)
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    for file, entries in plan.items():
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name, target, shard in entries:
                param = params[target]
                loader = getattr(param, "weight_loader", None)
                tensor = CheckpointSlice.open(f, name)
                try:
                    if loader is None:
                        if tensor.shape != param.shape:
                            raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
                        param.copy_(tensor.materialize())
                    else:
                        loader(param, tensor, shard)
                except ValueError as e:
                    raise ValueError(f"checkpoint tensor {name!r} ({file.name}): {e}") from e
                del tensor


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the right shapes, for benchmarks (``load_format="dummy"``): every matrix,
    embedding and bias ~ N(0, 0.02²), as Hugging Face initialises these models; RMSNorm weights 1.
    The logits then have a spread of ~0.02·sqrt(hidden_size): finite, varied, not one-hot.
    Deterministic for a given ``seed`` and device."""
    params = list(model.parameters())
    if not params:
        return
    gen = torch.Generator(device=params[0].device).manual_seed(int(seed))
    done = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in done:
                continue
            done.add(id(param))
            if isinstance(module, RMSNorm):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
