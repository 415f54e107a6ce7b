"""Pieces every training stage shares: mesh, optimizer, checkpoints, SIGTERM, throughput.

Checkpoints are an orbax `CheckpointManager` under <workdir>/checkpoints holding `params`,
`opt_state`, `step` and the number of processes that wrote them (`run`); the data needs no state:
resuming starts the loader at global batch = step (loaders.GlobalBatchSampler). Saves are asynchronous and
bounded (keep-N); a restore takes the latest *committed* step and lands each array on the current
mesh, so 8 devices -> 1 and back works.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from cope_jax import sharding
from cope_jax.errors import ConfigError


def check_positive(config, *fields: str) -> None:
    for field in fields:
        value = config[field]
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"config.{field} must be > 0, got {value!r}")


def build_mesh(config) -> jax.sharding.Mesh:
    shape = {axis: int(size) for axis, size in dict(config.mesh).items()}
    devices = jax.devices()
    fixed = int(np.prod(list(shape.values())))
    if -1 not in shape.values() and 0 < fixed < len(devices) and jax.process_count() == 1:
        devices = devices[:fixed]  # a smaller mesh on one host, e.g. to compare against 1 device
    try:
        return sharding.make_mesh(shape, devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh {shape}: {e} ({jax.device_count()} devices)") from None


def logical_rules(config) -> tuple:
    """config.logical_rules ({logical: mesh axis | [axes] | None}) -> the rules sharding.py takes."""
    rules = []
    for logical, axes in dict(config.logical_rules).items():
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        if axes is not None and not isinstance(axes, (str, tuple)):
            raise ConfigError(f"config.logical_rules.{logical}: expected a mesh axis name, a list of them or None, got {axes!r}")
        rules.append((logical, axes))
    return tuple(rules)


def batch_sharding(mesh) -> NamedSharding:
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes))


def batch_shards(mesh) -> int:
    """Devices the batch splits over (data x fsdp)."""
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


def global_batch(local: dict, mesh) -> dict:
    """This process's slice of the batch -> global arrays split over data x fsdp."""
    target = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(target, np.asarray(v)) for k, v in local.items()}


def accumulate_gradients(grad_fn, params, args: tuple, batch: dict, steps: int):
    """grad_fn(params, *args, micro_batch) -> (values, gradients), summed over `steps` micro-batches
    of `batch` in one scan (each stage turns the sums into its mean).

    Micro-batch a takes rows a, a+A, a+2A, ...: each device's contiguous rows hold every
    micro-batch, so the split needs no data movement. Each step indexes its rows in place (a
    transposed copy of the batch would be one more batch per device)."""
    grouped = jax.tree.map(lambda x: x.reshape(x.shape[0] // steps, steps, *x.shape[1:]), batch)

    def micro_batch(a):
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, a, axis=1, keepdims=False), grouped)

    def accumulate(sums, a):
        return jax.tree.map(jnp.add, sums, grad_fn(params, *args, micro_batch(a))), None

    values = jax.eval_shape(lambda: grad_fn(params, *args, micro_batch(0))[0])
    # Gradients start as zeros_like(params), so the accumulator takes the parameters' sharding.
    zeros = (jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), values), jax.tree.map(jnp.zeros_like, params))
    return jax.lax.scan(accumulate, zeros, jnp.arange(steps))[0]


def check_accumulation(config, mesh) -> None:
    """config.batch_size splits into config.grad_accum_steps micro-batches over the data x fsdp devices."""
    shards, steps = batch_shards(mesh), config.grad_accum_steps
    if config.batch_size % steps:
        raise ConfigError(f"config.batch_size {config.batch_size} is not divisible by config.grad_accum_steps {steps}")
    if (config.batch_size // steps) % shards:
        raise ConfigError(f"config.batch_size / config.grad_accum_steps = {config.batch_size // steps} "
                          f"is not divisible by the data x fsdp devices ({shards})")


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then cosine decay (paper App. C); no decay on biases and norms."""
    check_positive(config, "learning_rate", "total_steps")
    if config.warmup_steps >= config.total_steps:
        raise ConfigError(f"config.warmup_steps ({config.warmup_steps}) must be < config.total_steps ({config.total_steps})")
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps, config.total_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip_norm),
        optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, weight_decay=config.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def init_optimizer_state(tx: optax.GradientTransformation, params, mesh):
    """Optimizer state on the mesh, each moment sharded like its parameter, scalars (step
    counters) replicated. Sharding propagation alone cannot be trusted here: `zeros_like` does not
    depend on the parameter's values, and jit left every moment on one device (7B: 61 GiB of
    Adam moments per device; BENCHMARKS.md, stage 2 memory plan)."""
    return jax.jit(tx.init, out_shardings=optimizer_state_shardings(tx, params, mesh))(params)


def optimizer_state_shardings(tx: optax.GradientTransformation, params, mesh):
    """The sharding of every optimizer-state leaf: a leaf whose tree path ends with a parameter's
    path and has its shape (Adam's mu and nu, inside any chain / mask / multi_transform) takes
    that parameter's sharding; anything else is replicated."""
    by_path = {path_key(path): (leaf.shape, leaf.sharding) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding_of(path, leaf):
        key = path_key(path)
        for start in range(len(key)):
            match = by_path.get(key[start:])
            if match is not None and match[0] == leaf.shape:
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(sharding_of, jax.eval_shape(tx.init, params))


def path_key(path) -> tuple:
    """A jax tree path as strings (dict keys, attribute names, sequence indices)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class Checkpoints:
    def __init__(self, workdir: str, keep: int, every: int):
        self.every = every
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, *, force: bool = False) -> bool:
        """Saves when `step` is due (or `force`); a step already saved is left as it is. No data
        iterator state: the data position is a function of the step (loaders.GlobalBatchSampler),
        which also holds when another number of processes or grain workers resumes."""
        if (step % self.every and not force) or step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                                  run=ocp.args.JsonSave({"process_count": jax.process_count()}))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, params, opt_state) -> tuple[Any, Any]:
        """Restores `step` with the shapes, dtypes and shardings of the given (current) trees."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params)),
                                  opt_state=ocp.args.StandardRestore(_abstract(opt_state)))
        restored = self.manager.restore(step, args=args)
        return restored["params"], restored["opt_state"]

    def written_by(self, step: int) -> int | None:
        """How many processes wrote `step` (None: a checkpoint from before this was recorded)."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "run")):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]["process_count"]

    def restore_params(self, step: int, params):
        """Only the parameters of `step` (what inference and checkpoint assembly need)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params))))
        return restored["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def wait_for_process_0(what: str) -> None:
    """Multi-process runs: the others wait here until process 0 has written `what` (demo data,
    shared files); only process 0 ever writes them."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"cope_jax: {what}")


class StopRequest:
    """SIGTERM (preemption, scancel) -> finish the step, save, exit cleanly.

    Several processes get their SIGTERMs at different steps, and a process that stops alone leaves
    the others waiting in a collective. There jax.distributed's preemption service takes the
    signal and names one step at which every process stops together."""

    def __init__(self):
        self.requested = False
        self.multi_process = jax.process_count() > 1
        if not self.multi_process:  # a Python handler would replace the preemption service's
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def stop_at(self, step: int) -> bool:
        """Whether to save and stop after `step` (call after every step, on every process)."""
        if self.multi_process:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self):
        if not self.multi_process:
            signal.signal(signal.SIGTERM, self._previous)


class Throughput:
    """steps/s, examples/s and ETA over the last logging window."""

    def __init__(self, start_step: int, total_steps: int, batch_size: int):
        self.total, self.batch = total_steps, batch_size
        self.step, self.time = start_step, time.perf_counter()

    def update(self, step: int) -> dict:
        if step == self.step:  # the window ended where the meter started: nothing to measure yet
            return {}
        now = time.perf_counter()
        rate = (step - self.step) / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return {"steps_per_second": rate, "examples_per_second": rate * self.batch,
                "eta_seconds": (self.total - step) / max(rate, 1e-9)}


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
