"""From gradients to an update, the same for both stages: which parameters train, at what rate,
how gradients accumulate over micro-batches, and where the optimizer state lives on the mesh.

Which parameters train and how fast is said by regexes over "a/b/c" parameter paths (big_vision's
way): `config.trainable` minus `config.frozen` select them, the first `config.learning_rates`
entry matching a path sets its peak rate, every other trainable parameter takes
`config.learning_rate`. A stage config without those fields trains every parameter at one rate.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cope_jax import sharding
from cope_jax.errors import ConfigError


# ---------------------------------------------------------------------------- which parameters, how fast


def regex_problems(config) -> list[str]:
    """Bad regexes or rates in config.trainable / frozen / learning_rates (fields a config may lack)."""
    problems = []
    for field in ("trainable", "frozen"):
        for pattern in config.get(field, ()):
            problems += _regex_problem(f"config.{field}", pattern)
    for entry in config.get("learning_rates", ()):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], (int, float)) and entry[1] > 0):
            problems.append(f"config.learning_rates entries must be (regex, rate > 0), got {entry!r}")
        else:
            problems += _regex_problem("config.learning_rates", entry[0])
    return problems


def _regex_problem(field: str, pattern) -> list[str]:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        return [f"{field}: bad regex {pattern!r} ({e})"]
    return []


def path_key(path) -> tuple:
    """A jax tree path as strings (dict keys, attribute names, sequence indices)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def path_name(path) -> str:
    """A parameter's path as the regexes see it: "a/b/c"."""
    return "/".join(path_key(path))


def split_trainable(model: nnx.Module, config, frozen: tuple[str, ...] = ()):
    """-> graphdef, trainable params, frozen params, everything else (BatchNorm statistics).
    `frozen`: regexes the stage itself freezes, beside config.frozen."""
    trainable = [re.compile(p) for p in config.get("trainable", (".*",))]
    frozen = [re.compile(p) for p in (*config.get("frozen", ()), *frozen)]

    def is_trainable(path, value) -> bool:
        name = path_name(path)
        return (isinstance(value, nnx.Param) and any(p.search(name) for p in trainable)
                and not any(p.search(name) for p in frozen))

    graph, train, fixed, rest = nnx.split(model, is_trainable, nnx.Param, ...)
    if not jax.tree.leaves(train):
        raise ConfigError(f"config.trainable {list(config.get('trainable', ()))} minus config.frozen "
                          f"{list(config.get('frozen', ()))} selects no parameters")
    return graph, train, fixed, rest


def learning_rate_groups(params, config) -> tuple[dict, object]:
    """{group: peak rate} and the label tree for optax.multi_transform: the first
    config.learning_rates regex matching a parameter's path names its group, else "default"."""
    patterns = [(re.compile(p), float(rate)) for p, rate in config.get("learning_rates", ())]
    groups = {"default": float(config.learning_rate)}

    def label(path, _):
        name = path_name(path)
        for i, (pattern, rate) in enumerate(patterns):
            if pattern.search(name):
                groups[f"group{i}:{pattern.pattern}"] = rate
                return f"group{i}:{pattern.pattern}"
        return "default"

    labels = jax.tree_util.tree_map_with_path(label, params)
    return groups, labels


def warmup_steps(config) -> int:
    """Stage 1 counts its warmup in steps (paper App. C: 1000); stage 2 as a ratio of the run
    (LLaVA-Video's recipe: 0.03)."""
    if "warmup_steps" in config:
        return int(config.warmup_steps)
    return int(round(config.warmup_ratio * config.total_steps))


def make_optimizer(config, params):
    """AdamW per learning-rate group after one global-norm clip, each group with linear warmup then
    cosine decay (paper App. C; LLaVA-Video); no weight decay on biases and norms. Only `params`
    (the trainable ones) get optimizer state. -> (tx, the default group's schedule, {group: rate})."""
    warmup = warmup_steps(config)  # its bounds are checked with the config (training.checks, finetune.check_config)
    groups, labels = learning_rate_groups(params, config)
    schedules = {name: optax.warmup_cosine_decay_schedule(0.0, rate, warmup, config.total_steps)
                 for name, rate in groups.items()}
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731 - no decay on biases and norms
    transforms = {name: optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                                    weight_decay=config.weight_decay, mask=decay_mask)
                  for name, schedule in schedules.items()}
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optax.multi_transform(transforms, labels))
    return tx, schedules["default"], groups


# ---------------------------------------------------------------------------- optimizer state on the mesh


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


# ---------------------------------------------------------------------------- gradient accumulation


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


def with_accumulation(config, mesh):
    """The config with config.grad_accum_steps resolved for `mesh` and checked: 0 (stage 2 only)
    means one row per data x fsdp device at a time, i.e. global batch / those devices micro-batches;
    micro-batches must split evenly over those devices."""
    shards, steps = sharding.batch_shards(mesh, sharding.logical_rules(config)), config.grad_accum_steps
    if steps == 0:  # its type and sign are checked with the config (the stages' check_config)
        if config.batch_size % shards:
            raise ConfigError(f"config.batch_size {config.batch_size} is not divisible by the data x fsdp devices ({shards})")
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.grad_accum_steps = steps = config.batch_size // shards
    if config.batch_size % steps:
        raise ConfigError(f"config.batch_size {config.batch_size} is not divisible by config.grad_accum_steps {steps}")
    if (config.batch_size // steps) % shards:
        raise ConfigError(f"config.batch_size / config.grad_accum_steps = {config.batch_size // steps} "
                          f"is not divisible by the data x fsdp devices ({shards})")
    return config
