"""Building blocks shared by the models: annotated Linear/LayerNorm and a dtype policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cope_jax.sharding import constrain_rows, initializer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Activation rematerialisation per transformer layer (jax.checkpoint policies): "layer" recomputes
# everything in the backward pass, "dots" keeps the matmul outputs without batch dimensions.
REMAT_POLICIES = {"none": None, "layer": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def layer_runner(remat: str, apply=lambda layer, x: layer(x)):
    """`apply(layer, x)` under `remat`'s policy (REMAT_POLICIES). The checkpointed function takes the
    layer's weights as an argument (split from its graph, merged inside) instead of closing over
    them, so they are inputs of the recomputation, not constants, and stateful layers (BatchNorm's
    statistics) are read without being lifted."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    if remat == "none":
        return apply

    def run(layer, x):
        graph, state = nnx.split(layer)
        return jax.checkpoint(lambda s, h: apply(nnx.merge(graph, s), h), policy=REMAT_POLICIES[remat])(state, x)

    return run


def run_layers(layers, x: jax.Array, apply=lambda layer, h: layer(h), *, remat: str = "none", scan: bool = False,
               dtype=None) -> jax.Array:
    """`x` through `layers` in order, `apply(layer, x)` each, under `remat`'s policy.

    scan: one `jax.lax.scan` over the layers' weights, stacked inside the program after a cast of
    the floating ones to `dtype` (the compute dtype; every layer casts them to it anyway, so results
    are the same). The compiler then sees one layer instead of all of them: compile time stops growing
    with depth, and under FSDP each layer's weights are gathered inside the loop, in `dtype`, and
    freed after it, instead of being scheduled at XLA's discretion across the whole stack."""
    pinned = lambda layer, h: constrain_rows(apply(layer, constrain_rows(h)))  # noqa: E731 - rows stay split
    if not scan or len(layers) < 2:
        run = layer_runner(remat, pinned)
        for layer in layers:
            x = run(layer, x)
        return x
    graph, first = nnx.split(layers[0])
    treedef = jax.tree.structure(first)

    def cast(leaf):
        return leaf.astype(dtype) if dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    stacked = [jnp.stack([cast(leaf) for leaf in leaves])
               for leaves in zip(*(jax.tree.leaves(nnx.state(layer)) for layer in layers))]

    def body(h, leaves):
        return pinned(nnx.merge(graph, jax.tree.unflatten(treedef, leaves)), h), None

    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    if remat != "none":  # the scan already keeps XLA from merging the recomputation away
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, x, stacked)[0]


def set_remat(model: nnx.Module, remat: str) -> None:
    """Per-layer activation remat ("none", "layer", "dots") for every layer stack inside `model` that
    takes one (the vision tower, the Δ-encoder's transformers and ResNet trunk; the LLM's is an
    argument of its forward). Static: the next jit call recompiles."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "remat"):
            module.remat = remat


def set_scan_layers(model: nnx.Module, scan: bool) -> None:
    """Runs every layer stack inside `model` (the LLM, the vision tower, the Δ-encoder's
    transformers) as one scan (`run_layers`) or unrolled. Static: the next jit call recompiles."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "scan_layers"):
            module.scan_layers = bool(scan)


def resolve_dtype(name_or_dtype) -> jnp.dtype:
    """'bfloat16' / jnp.bfloat16 -> jnp.bfloat16, with a clear error for anything else."""
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in DTYPES:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[name_or_dtype]
    return jnp.dtype(name_or_dtype)


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True,
           dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear whose kernel [in, out] and bias [out] carry logical axis names."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=initializer(nnx.initializers.lecun_normal(), axes),
        bias_init=initializer(nnx.initializers.zeros_init(), axes[1:]),
        rngs=rngs,
    )


def layer_norm(features: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        features, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
        scale_init=initializer(nnx.initializers.ones_init(), ("embed",)),
        bias_init=initializer(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMSNorm as HF Qwen2RMSNorm: normalise in fp32, cast back, then scale (matters in bf16)."""

    def __init__(self, features: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


def parameter_count(module: nnx.Module) -> int:
    """Number of trainable weights (nnx.Param), abstract modules included."""
    return int(sum(np.prod(v.shape) for v in jax.tree.leaves(nnx.state(module, nnx.Param))))
