"""Building blocks shared by the models: annotated Linear/LayerNorm and a dtype policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cope_jax.sharding import initializer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Activation rematerialisation per transformer layer (jax.checkpoint policies): "layer" recomputes
# everything in the backward pass, "dots" keeps the matmul outputs without batch dimensions.
REMAT_POLICIES = {"none": None, "layer": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def layer_runner(remat: str, apply=lambda layer, x: layer(x)):
    """`apply(layer, x)` under `remat`'s policy (REMAT_POLICIES). The layer stays an argument, so
    nnx lifts its weights into the checkpointed function instead of closing over them."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
    return apply if remat == "none" else nnx.remat(apply, policy=REMAT_POLICIES[remat])


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
