"""SigLIP vision tower (HF `SiglipVisionModel` semantics) in Flax NNX.

Images are NHWC, normalised as the SigLIP processor does ((x/255 - 0.5)/0.5). Axis alphabet:
B batch, P patches, D width, F mlp dim. Attribute names mirror HF's `vision_model.*`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cope_jax.models.attention import encoder_attention
from cope_jax.models.common import layer_norm, linear, resolve_dtype, run_layers
from cope_jax.sharding import initializer


SCOPE = "vision_tower"


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-6
    use_post_layernorm: bool = True

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @classmethod
    def so400m_patch14_384(cls) -> "SiglipVisionConfig":
        """google/siglip-so400m-patch14-384, all 27 layers with post-layernorm."""
        return cls()

    @classmethod
    def llava_video_tower(cls) -> "SiglipVisionConfig":
        """The tower as LLaVA-Video uses it: last layer removed, no post-layernorm (26 layers)."""
        return dataclasses.replace(cls(), num_hidden_layers=26, use_post_layernorm=False)

    @classmethod
    def tiny(cls) -> "SiglipVisionConfig":
        return cls(image_size=70, patch_size=14, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")


class SiglipEmbeddings(nnx.Module):
    def __init__(self, config: SiglipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p = config.patch_size
        self.patch_embedding = nnx.Conv(
            config.num_channels, config.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID",
            dtype=dtype, param_dtype=param_dtype,
            kernel_init=initializer(nnx.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=initializer(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)
        # HF keeps this as nn.Embedding over position ids 0..P-1; a plain table is the same thing.
        self.position_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (config.num_patches, config.hidden_size), param_dtype),
            logical_axes=(None, "embed"))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        x = self.patch_embedding(pixel_values)  # [B,h,w,D]
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # row-major, as HF's flatten(2)
        return x + self.position_embedding[...].astype(x.dtype)


class SiglipAttention(nnx.Module):
    attention_kind = "encoder"  # `attention.set_attention` finds the layers by this

    def __init__(self, config: SiglipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = linear(d, d, ("embed", "heads"), **kw)
        self.v_proj = linear(d, d, ("embed", "heads"), **kw)
        self.out_proj = linear(d, d, ("heads", "embed"), **kw)
        self.num_heads = config.num_attention_heads
        # How attention runs (`attention.set_attention`); not in the config, so checkpoints never store it.
        self.implementation, self.platform = "auto", None

    def __call__(self, x: jax.Array) -> jax.Array:
        b, p, d = x.shape
        split = lambda y: y.reshape(b, p, self.num_heads, d // self.num_heads)  # noqa: E731
        out = encoder_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                implementation=self.implementation, platform=self.platform)
        return self.out_proj(out.reshape(b, p, d))


class SiglipMLP(nnx.Module):
    def __init__(self, config: SiglipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))  # HF gelu_pytorch_tanh


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, config: SiglipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm1 = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.self_attn = SiglipAttention(config, **kw)
        self.layer_norm2 = layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
        self.mlp = SiglipMLP(config, **kw)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nnx.Module):
    def __init__(self, config: SiglipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([SiglipEncoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        # Activation remat per layer when trained (`set_remat`); not in the config, so checkpoints never store it.
        self.remat, self.scan_layers = "none", False  # `common.set_scan_layers` for the latter
        self.dtype = dtype

    def __call__(self, x):
        return run_layers(self.layers, x, remat=self.remat, scan=self.scan_layers, dtype=self.dtype)


class SiglipVisionModel(nnx.Module):
    """pixel_values float32[B,H,W,3] -> last_hidden_state [B,P,D] (post-layernorm iff configured)."""

    def __init__(self, config: SiglipVisionConfig, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        dtype, param_dtype = resolve_dtype(dtype), resolve_dtype(param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.embeddings = SiglipEmbeddings(config, **kw)
        self.encoder = SiglipEncoder(config, **kw)
        self.post_layernorm = (layer_norm(config.hidden_size, config.layer_norm_eps, **kw)
                               if config.use_post_layernorm else None)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        expected = (self.config.image_size, self.config.image_size, self.config.num_channels)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"SigLIP expects NHWC images of shape [B,{','.join(map(str, expected))}], got {pixel_values.shape}")
        with jax.named_scope(SCOPE):  # names its ops in compiled programs (the compile report's kernels)
            x = self.encoder(self.embeddings(pixel_values))
            return x if self.post_layernorm is None else self.post_layernorm(x)
