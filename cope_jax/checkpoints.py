"""Saving and loading cope_jax models (converted or trained) with orbax.

A checkpoint directory holds `model.json` (model kind, config, dtype, where it came from) and
`params/` (orbax). Loading rebuilds the module abstractly and restores every array straight into
the current device layout, so a checkpoint written on 8 devices loads on 1 and vice versa.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cope_jax.errors import UserError
from cope_jax import sharding
from cope_jax.models import KINDS, config_from_dict, config_to_dict, kind_of

MODEL_FILE = "model.json"
PARAMS_DIR = "params"


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete or not a cope_jax checkpoint."""


def _dtype_of(module: nnx.Module) -> str:
    leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))]
    return str(np.dtype(leaves[0].dtype)) if leaves else "float32"


def _largest_array_bytes(state) -> int:
    return max((leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state)), default=0)


def save(directory: str, module: nnx.Module, **info) -> None:
    """Writes `module` (weights + what is needed to rebuild it) to a new directory."""
    directory = os.path.abspath(directory)
    kind = kind_of(module)
    state = nnx.state(module)
    # Synchronous, with a bounded window of arrays copied to host and in flight: by default orbax
    # stages a host copy of the whole state before writing, doubling peak memory (BENCHMARKS.md).
    window_gb = max(_largest_array_bytes(state), 2**28) / 1e9
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=window_gb, save_device_host_concurrent_gb=window_gb)
    # Every process of a multi-process run calls this: orbax writes each process's shards.
    ocp.Checkpointer(handler).save(os.path.join(directory, PARAMS_DIR), args=ocp.args.PyTreeSave(state))
    if jax.process_index() == 0:
        meta = {"kind": kind, "config": config_to_dict(module.config), "dtype": _dtype_of(module), **info}
        with open(os.path.join(directory, MODEL_FILE), "w") as f:
            json.dump(meta, f, indent=2)


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory}: not a cope_jax checkpoint (no {MODEL_FILE}; convert with python -m cope_jax.convert)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if meta.get("kind") not in KINDS:
        raise CheckpointError(f"{path}: unknown model kind {meta.get('kind')!r}")
    return meta


def load(directory: str, *, mesh=None, rules=sharding.DEFAULT_RULES, dtype=None, param_dtype=None) -> nnx.Module:
    """Rebuilds the saved module; with `mesh`, each weight lands on its shard. `dtype` (compute)
    and `param_dtype` default to the saved dtype; given, weights are cast while restoring (e.g. a
    bfloat16 checkpoint into float32 master weights for training)."""
    directory = os.path.abspath(directory)
    meta = read_meta(directory)
    module_class, _ = KINDS[meta["kind"]]
    config = config_from_dict(meta["kind"], meta["config"])
    dtype, param_dtype = dtype or meta["dtype"], param_dtype or meta["dtype"]
    abstract = nnx.eval_shape(lambda: module_class(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_state)
    else:
        shardings = sharding.state_shardings(abstract_state, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    try:
        state = ocp.StandardCheckpointer().restore(os.path.join(directory, PARAMS_DIR), target)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{directory}: cannot restore weights ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return nnx.merge(graphdef, state)
