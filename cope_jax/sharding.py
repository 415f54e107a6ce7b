"""Logical axis names -> device mesh: the one place that knows how weights and batches are laid out.

Every weight is created with `logical_axes` metadata (names from the axis alphabet: `embed`,
`mlp`, `heads`, `kv_heads`, `vocab`, `conv_out`, ...). A config maps those names to mesh axes with
a short rule list (MaxText's `logical_axis_rules`), and this module turns rules + mesh into
`NamedSharding`s. A dimension that the mesh axis does not divide stays replicated instead of failing
(e.g. one KV head on a 2-way tensor axis). The `batch` rule names the axes batches split over
(`batch_sharding`, `global_batch`) and activations are pinned to (`constrain_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cope_jax.errors import ConfigError

# (logical name, mesh axis or tuple of mesh axes). A name not listed is replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "tensor"),
    ("conv_in", "fsdp"),
)

DEFAULT_MESH_SHAPE = {"data": -1, "fsdp": 1, "tensor": 1}


def initializer(init: Callable, logical_axes: tuple[str | None, ...]) -> Callable:
    """Wraps a Flax initializer so the created Param carries its logical axis names."""
    return nnx.with_metadata(init, logical_axes=logical_axes)


def make_mesh(mesh_shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh from `{axis: size}`; one size may be -1 (all remaining devices)."""
    mesh_shape = dict(mesh_shape or DEFAULT_MESH_SHAPE)
    devices = list(devices if devices is not None else jax.devices())
    known = math.prod(size for size in mesh_shape.values() if size != -1)
    if list(mesh_shape.values()).count(-1) > 1:
        raise ValueError(f"mesh shape {mesh_shape}: at most one axis may be -1")
    if -1 in mesh_shape.values():
        if len(devices) % known:
            raise ValueError(f"mesh shape {mesh_shape} does not divide {len(devices)} devices")
        mesh_shape = {k: (len(devices) // known if v == -1 else v) for k, v in mesh_shape.items()}
    if math.prod(mesh_shape.values()) != len(devices):
        raise ValueError(f"mesh shape {mesh_shape} needs {math.prod(mesh_shape.values())} devices, have {len(devices)}")
    grid = np.asarray(devices).reshape(tuple(mesh_shape.values()))
    return Mesh(grid, tuple(mesh_shape.keys()))


def build_mesh(config) -> Mesh:
    """The mesh of a training config (`config.mesh`: {axis: size}, one size may be -1)."""
    shape = {axis: int(size) for axis, size in dict(config.mesh).items()}
    devices = jax.devices()
    fixed = int(np.prod(list(shape.values())))
    if -1 not in shape.values() and 0 < fixed < len(devices) and jax.process_count() == 1:
        devices = devices[:fixed]  # a smaller mesh on one host, e.g. to compare against 1 device
    try:
        return make_mesh(shape, devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh {shape}: {e} ({jax.device_count()} devices)") from None


def logical_rules(config) -> tuple:
    """config.logical_rules ({logical: mesh axis | [axes] | None}) -> the rules this module takes."""
    rules = []
    for logical, axes in dict(config.logical_rules).items():
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        if axes is not None and not isinstance(axes, (str, tuple)):
            raise ConfigError(f"config.logical_rules.{logical}: expected a mesh axis name, a list of them or None, got {axes!r}")
        rules.append((logical, axes))
    return tuple(rules)


def batch_axes(mesh, rules=DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes the `batch` rule splits batches over (those this mesh has)."""
    axes = dict(rules).get("batch") or ()
    return tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.axis_names)


def batch_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, rules)))


def batch_shards(mesh, rules=DEFAULT_RULES) -> int:
    """Devices a batch splits over (data x fsdp by default)."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh, rules)]))


def global_batch(local: dict, mesh, rules=DEFAULT_RULES) -> dict:
    """This process's slice of the batch -> global arrays split by rows over the batch axes."""
    target = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(target, np.asarray(v)) for k, v in local.items()}


def logical_to_spec(logical_axes, shape, mesh: Mesh, rules=DEFAULT_RULES) -> PartitionSpec:
    """Maps one array's logical axis names to a PartitionSpec valid for `shape` on `mesh`."""
    if not logical_axes:
        return PartitionSpec()
    rule_map = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        mesh_axes = rule_map.get(name) if name else None
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        # An axis already used by an earlier dim, or of size 1, adds nothing.
        mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def _variable_sharding(variable: nnx.Variable, mesh: Mesh, rules) -> NamedSharding:
    axes = variable.get_metadata().get("logical_axes")
    shape = np.shape(variable.get_value())
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """The NamedSharding of every variable in `state` (abstract or concrete)."""
    return jax.tree.map(
        lambda v: v.replace(_variable_sharding(v, mesh, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def put(tree, shardings):
    """`jax.device_put(tree, shardings)` that also works in a multi-process run, where arrays every
    process holds whole (loaded on a local device, or numpy) cannot be moved to other hosts: each
    process fills its own shards of the global array from its local copy."""

    def place(x, target):
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, target)  # global -> global: XLA moves the shards
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

    return jax.tree.map(place, tree, shardings)


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Initialises `factory()` with every weight born on its shard (no unsharded copy)."""
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    init = jax.jit(lambda: nnx.state(factory()), out_shardings=shardings)
    return nnx.merge(graphdef, init())


def reshard(module: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> None:
    """Every array of `module` onto its shard (after parts were replaced from single-device loads)."""
    state = nnx.state(module)
    nnx.update(module, put(state, state_shardings(state, mesh, rules)))


def replicated_large_weights(module: nnx.Module, min_size: int = 2**14) -> list[str]:
    """Paths of weights with >= min_size elements that are fully replicated (none expected)."""
    offenders = []
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        value = variable.get_value()
        if value.size >= min_size and value.sharding.is_fully_replicated and len(value.sharding.device_set) > 1:
            offenders.append("/".join(map(str, path)))
    return offenders


def constrain_rows(x: jax.Array) -> jax.Array:
    """Activations [B, ...] split by rows over the batch rule's mesh axes (data x fsdp) of the mesh
    in context (`jax.set_mesh`); unchanged without one. FSDP shards weights on their embed axis and
    the batch on rows: left alone, XLA can resolve that conflict by gathering the rows of an
    activation instead of the weights of a layer (measured: 8 rows of [16384, 18944] per device at
    7B), so every layer stack pins its activations to the rows here, as MaxText's logical
    activation constraints do."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes if len(axes) > 1 else axes[0]))
