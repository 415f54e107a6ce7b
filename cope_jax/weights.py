"""Reading PyTorch checkpoints one tensor at a time, and applying a declarative weight map.

Readers: safetensors (single file or sharded via `*.safetensors.index.json`), parsed here and
read one tensor at a time, so bf16 needs no torch and memory holds one tensor; PyTorch
`.bin`/`.pt`/`.pth` through `torch.load(weights_only=True, mmap=True)` (no pickle code runs). A weight map is a list of
`Rule(source regex, target path template, transform)`; `apply_rules` streams every source tensor
through it into an abstract NNX state and reports *all* problems at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from cope_jax.errors import UserError


class ConversionError(UserError):
    """A checkpoint cannot be converted; the message names the file and the reason."""


SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """Header-validated safetensors file: tensors are read only when asked for."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConversionError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            header_len = struct.unpack("<Q", raw)[0]
            if header_len > min(size - 8, 100 * 2**20):
                raise ConversionError(f"{path}: corrupt safetensors header (declares {header_len} bytes, file has {size})")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self.entries = {}
        for key, entry in header.items():
            dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise ConversionError(f"{path}: tensor {key} has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
                raise ConversionError(f"{path}: tensor {key} has {end - begin} bytes for shape {shape}")
            if self._data_start + end > size:
                raise ConversionError(f"{path}: truncated file (tensor {key} ends at byte {self._data_start + end}, file has {size})")
            self.entries[key] = (dtype, shape, begin)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def read(self, key: str) -> np.ndarray:
        # A positional read into a fresh buffer rather than a memory map: mapped pages count
        # towards resident memory until unmapped, so converting a big file would hold all of it.
        dtype, shape, begin = self.entries[key]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise ConversionError(f"{self.path}: truncated while reading {key}")
        return out


class TorchFile:
    """A PyTorch state-dict file loaded with weights_only=True and mmap (no pickle code runs)."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise ConversionError(f"{path}: reading PyTorch .bin/.pt files needs torch (pip install 'cope-jax[test]' or torch)") from None
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for corrupt/truncated zip or pickle data
            raise ConversionError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{path}: not a state dict of tensors")
        self._state = state
        self.entries = {k: None for k in state}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def read(self, key: str) -> np.ndarray:
        import torch

        tensor = self._state[key].detach()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


def _open_file(path: str):
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    return TorchFile(path)


WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class CheckpointReader:
    """All tensors of a checkpoint directory (or single file), keyed by name."""

    def __init__(self, path: str):
        self.path = path
        self.files = [_open_file(p) for p in self._weight_files(path)]
        self._owner = {}
        for f in self.files:
            for key in f.entries:
                if key in self._owner:
                    raise ConversionError(f"{f.path}: tensor {key} also appears in {self._owner[key].path}")
                self._owner[key] = f

    @staticmethod
    def _weight_files(path: str) -> list[str]:
        if os.path.isfile(path):
            return [path]
        if not os.path.isdir(path):
            raise ConversionError(f"{path}: no such file or directory")
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = os.path.join(path, index_name)
            if os.path.exists(index_path):
                try:
                    weight_map = json.load(open(index_path))["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise ConversionError(f"{index_path}: corrupt shard index ({e})") from None
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
                if missing:
                    raise ConversionError(f"{index_path}: shard files missing: {', '.join(missing)}")
                return [os.path.join(path, f) for f in files]
        for preferred in (".safetensors", ".bin", ".pt", ".pth"):
            files = sorted(f for f in os.listdir(path) if f.endswith(preferred) and not f.startswith("."))
            if files:
                return [os.path.join(path, f) for f in files]
        raise ConversionError(f"{path}: no weight files (*.safetensors, *.bin, *.pt, *.pth)")

    def keys(self) -> list[str]:
        return sorted(self._owner)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner[key].shape(key)

    def read(self, key: str) -> np.ndarray:
        return self._owner[key].read(key)

    def file_of(self, key: str) -> str:
        return self._owner[key].path


# --- transforms: PyTorch layout -> Flax layout -------------------------------------------------

def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_kernel(x: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax kernel [in, out]."""
    return x.T


def conv_kernel(x: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O]."""
    return x.transpose(2, 3, 1, 0)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Source keys matching `pattern` (full match) fill target `template` (re group refs allowed)."""

    pattern: str
    template: str | None  # None = explicitly ignored (the reason goes in `why`)
    transform: Callable[[np.ndarray], np.ndarray] = identity
    why: str = ""


def ignore(pattern: str, why: str) -> Rule:
    return Rule(pattern, None, identity, why)


def with_prefix(rules: list[Rule], source_prefix: str, target_prefix: str) -> list[Rule]:
    """The same rules for a sub-model nested under other key prefixes."""
    return [Rule(re.escape(source_prefix) + r.pattern, None if r.template is None else target_prefix + r.template,
                 r.transform, r.why) for r in rules]


def _resolve(rules: list[Rule], key: str) -> tuple[Rule, str | None] | None:
    for rule in rules:
        match = re.fullmatch(rule.pattern, key)
        if match:
            return rule, None if rule.template is None else match.expand(rule.template)
    return None


def _summarise(problems: list[str], limit: int = 8) -> str:
    """One line: the first few problems, then how many more."""
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def apply_rules(reader: CheckpointReader, rules: list[Rule], abstract_module: nnx.Module,
                shardings=None, progress: bool = True, defaults: nnx.State | None = None) -> nnx.Module:
    """Fills every weight of `abstract_module` (from nnx.eval_shape) from `reader`, strictly.

    Each tensor is read, transformed, checked, cast to the target dtype and placed (on its
    sharding when `shardings`, a state of NamedSharding, is given) before the next is read.
    `defaults` (a state of part of the module, e.g. a sub-model the source does not have) fills
    the targets it holds that no source tensor fills; a source tensor for such a target is an error.
    """
    graphdef, abstract_state = nnx.split(abstract_module)
    targets = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(abstract_state)}
    values = {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(defaults)} if defaults else {}
    target_shardings = ({".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(shardings)}
                        if shardings is not None else {})
    problems, filled = [], {}
    # Plan first (names and shapes only), so a bad mapping fails before any heavy reading.
    plan = []
    for key in reader.keys():
        resolved = _resolve(rules, key)
        if resolved is None:
            problems.append(f"unexpected source tensor {key} in {reader.file_of(key)}")
            continue
        rule, target = resolved
        if target is None:
            continue
        if target not in targets:
            problems.append(f"source tensor {key} maps to {target}, which the model does not have")
        elif target in filled:
            problems.append(f"target {target} filled twice: by {filled[target]} and {key}")
        elif target in values:
            problems.append(f"source tensor {key} maps to {target}, which is supplied separately")
        else:
            filled[target] = key
            plan.append((key, target, rule.transform))
    problems += [f"supplied {target} is not a weight of the model" for target in values if target not in targets]
    for target, var in targets.items():
        if target in values and tuple(values[target].shape) != tuple(var.get_value().shape):
            problems.append(f"supplied {target} has shape {tuple(values[target].shape)}, the model needs {tuple(var.get_value().shape)}")
        elif target not in filled and target not in values:
            problems.append(f"model weight {target} has no source tensor")
    for key, target, transform in plan:
        expected = tuple(targets[target].get_value().shape)
        got = tuple(transform(np.broadcast_to(np.uint8(0), reader.shape(key))).shape)  # a view: no memory
        if got != expected:
            problems.append(f"{key}: shape {reader.shape(key)} -> {got} does not fit {target} {expected}")
    if problems:
        raise ConversionError(f"{reader.path}: {len(problems)} problem(s) mapping the checkpoint: {_summarise(problems)}")
    for key, target, transform in tqdm(plan, desc="converting", unit="tensor", disable=not progress):
        dtype = targets[target].get_value().dtype
        array = np.ascontiguousarray(transform(reader.read(key))).astype(dtype, copy=False)
        values[target] = jax.device_put(array, target_shardings.get(target))
        del array
    for target in values.keys() - filled.keys():  # supplied defaults: the target's dtype and place
        values[target] = jax.device_put(values[target].astype(targets[target].get_value().dtype), target_shardings.get(target))
    flat = [(path, var.replace(values[".".join(map(str, path))])) for path, var in nnx.to_flat_state(abstract_state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def read_config(path: str) -> dict | None:
    """config.json beside the weights (None when converting a bare state-dict file)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        return None
    try:
        with open(config_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config_path}: not valid JSON ({e})") from None

