"""The Δ-encoder (paper §3.2, App. B) and its stage-1 pretraining heads (paper §3.3, Eq. 7-10).

DeltaEncoder(mv [B,H,W,2], residual [B,H,W,3]) -> [B, Kτ + Kδ, d]: motion tokens then residual tokens.
- Motion branch: per-sample min-max normalisation of `mv` to [-1, 1], non-overlapping
  `patch_size` patches, a shared 2-layer MLP per patch, then a transformer whose Kτ learnable
  queries read all patches.
- Residual branch: a ResNet-18 trunk on the residual (scaled to [-1, 1]), a linear map to d, then
  an identical transformer with Kδ queries.
DeltaPretrainer adds the reference and warped transformers that predict the next step's SigLIP
tokens; they are dropped after pretraining.

The paper's sizes (4 layers, d = 1152, 9 heads) and its "<15M parameters" disagree; every size is a
config field and `parameter_count` reports the truth (docs/training.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cope_jax.models.common import layer_norm, linear, parameter_count, resolve_dtype  # noqa: F401 - re-exported
from cope_jax.models.resnet.modeling import ResNet, ResNetConfig
from cope_jax.models.siglip.modeling import SiglipEncoder, SiglipVisionConfig
from cope_jax.sharding import initializer


SCOPE = "delta_encoder"


@dataclasses.dataclass(frozen=True)
class DeltaEncoderConfig:
    image_size: int = 384
    patch_size: int = 16  # motion patches (App. B)
    width: int = 1152  # d: SigLIP's width, so Δ-tokens live in its feature space
    depth: int = 4
    num_heads: int = 9
    mlp_ratio: float = 4.0
    motion_queries: int = 4  # Kτ
    residual_queries: int = 4  # Kδ
    # App. B: "all convolutional layers up to the final global pooling" = 4 stages (stride 32,
    # a 12x12 grid at 384 px), although it also says the grid equals the 16-px motion grid (that
    # would be 3 stages). We follow the first sentence; set depths=(2, 2, 2) for the second.
    resnet: ResNetConfig = dataclasses.field(default_factory=ResNetConfig.resnet18)
    residual_scale: float = 255.0  # residual int16 in [-255, 255] -> [-1, 1]
    layer_norm_eps: float = 1e-6

    @classmethod
    def paper(cls) -> "DeltaEncoderConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "DeltaEncoderConfig":
        return cls(image_size=64, patch_size=16, width=48, depth=1, num_heads=4, resnet=ResNetConfig.tiny())

    @classmethod
    def from_dict(cls, d: dict) -> "DeltaEncoderConfig":
        d = dict(d)
        if isinstance(d.get("resnet"), dict):
            d["resnet"] = ResNetConfig(**d["resnet"])
        return cls(**d)

    @property
    def num_tokens(self) -> int:
        return self.motion_queries + self.residual_queries

    @property
    def motion_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def residual_grid(self) -> int:
        side = -(-self.image_size // 2)  # stem conv, stride 2, padding 3
        side = -(-side // 2)  # max pool, stride 2, padding 1
        for _ in self.resnet.depths[1:]:  # every stage after the first halves the grid
            side = -(-side // 2)
        return side

    def transformer_config(self) -> SiglipVisionConfig:
        """The pre-norm transformer blocks are SigLIP's (MHA + gelu-tanh MLP), at our sizes."""
        return SiglipVisionConfig(hidden_size=self.width, intermediate_size=int(self.width * self.mlp_ratio),
                                  num_hidden_layers=self.depth, num_attention_heads=self.num_heads,
                                  layer_norm_eps=self.layer_norm_eps)

    def __post_init__(self):
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            problems.append(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if min(self.depth, self.motion_queries, self.residual_queries) < 1:
            problems.append("depth, motion_queries and residual_queries must be >= 1")
        if problems:
            raise ValueError("DeltaEncoderConfig: " + "; ".join(problems))


class QueryTransformer(nnx.Module):
    """[B, N, d] inputs -> [B, K, d]: K learnable queries prepended, pre-norm blocks, final LayerNorm."""

    def __init__(self, config: DeltaEncoderConfig, num_inputs: int, num_queries: int, *, dtype, param_dtype, rngs):
        d = config.width
        self.queries = nnx.Param(initializer(nnx.initializers.normal(0.02), (None, "embed"))(rngs.params(), (num_queries, d), param_dtype))
        self.position = nnx.Param(initializer(nnx.initializers.normal(0.02), (None, "embed"))(rngs.params(), (num_inputs, d), param_dtype))
        self.encoder = SiglipEncoder(config.transformer_config(), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = layer_norm(d, config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_queries = num_queries
        self.dtype = dtype

    def __call__(self, inputs: jax.Array) -> jax.Array:
        batch = inputs.shape[0]
        queries = jnp.broadcast_to(self.queries[...], (batch, *self.queries.shape)).astype(self.dtype)
        x = jnp.concatenate([queries, (inputs + self.position[...]).astype(self.dtype)], axis=1)
        return self.norm(self.encoder(x)[:, : self.num_queries])


def normalize_motion(mv: jax.Array) -> jax.Array:
    """Per-sample min-max to [-1, 1] over the whole field (App. B); a constant field maps to 0."""
    low = mv.min(axis=(1, 2, 3), keepdims=True)
    high = mv.max(axis=(1, 2, 3), keepdims=True)
    span = high - low
    return jnp.where(span > 0, 2 * (mv - low) / jnp.where(span > 0, span, 1) - 1, 0.0)


def patchify(x: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], patches in raster order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class DeltaEncoder(nnx.Module):
    """mv float32[B,H,W,2], residual [B,H,W,3] (int16 or float, raw pixel units) -> [B, Kτ+Kδ, d]."""

    def __init__(self, config: DeltaEncoderConfig, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        dtype, param_dtype = resolve_dtype(dtype), resolve_dtype(param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        d = config.width
        self.motion_fc1 = linear(config.patch_size**2 * 2, d, (None, "embed"), **kw)
        self.motion_fc2 = linear(d, d, ("embed", "embed"), **kw)
        self.motion_transformer = QueryTransformer(config, config.motion_grid**2, config.motion_queries, **kw)
        self.residual_trunk = ResNet(config.resnet, **kw)
        self.residual_proj = linear(config.resnet.hidden_sizes[-1], d, (None, "embed"), **kw)
        self.residual_transformer = QueryTransformer(config, config.residual_grid**2, config.residual_queries, **kw)

    def motion_tokens(self, mv: jax.Array) -> jax.Array:
        patches = patchify(normalize_motion(mv.astype(jnp.float32)), self.config.patch_size)
        return self.motion_transformer(self.motion_fc2(jax.nn.gelu(self.motion_fc1(patches), approximate=False)))

    def residual_tokens(self, residual: jax.Array) -> jax.Array:
        features = self.residual_trunk(residual.astype(jnp.float32) / self.config.residual_scale)
        b, h, w, c = features.shape
        return self.residual_transformer(self.residual_proj(features.reshape(b, h * w, c)))

    def __call__(self, mv: jax.Array, residual: jax.Array) -> jax.Array:
        expected = (self.config.image_size, self.config.image_size)
        if mv.shape[1:] != (*expected, 2) or residual.shape[1:] != (*expected, 3):
            raise ValueError(f"DeltaEncoder expects mv [B,{expected[0]},{expected[1]},2] and residual [B,...,3], "
                             f"got {mv.shape} and {residual.shape}")
        with jax.named_scope(SCOPE):  # names its ops in compiled programs (the compile report's kernels)
            return jnp.concatenate([self.motion_tokens(mv), self.residual_tokens(residual)], axis=1)


class TokenMixer(nnx.Module):
    """Reference / warped transformer (Eq. 8-9): [B, N, d] base tokens + [B, K, d] extra tokens ->
    updated [B, N, d] base tokens. A learned segment embedding tells the two groups apart."""

    def __init__(self, config: DeltaEncoderConfig, *, dtype, param_dtype, rngs):
        self.segment = nnx.Param(initializer(nnx.initializers.normal(0.02), (None, "embed"))(rngs.params(), (2, config.width), param_dtype))
        self.encoder = SiglipEncoder(config.transformer_config(), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = layer_norm(config.width, config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, base: jax.Array, extra: jax.Array) -> jax.Array:
        x = jnp.concatenate([base + self.segment[0], extra + self.segment[1]], axis=1)
        return self.norm(self.encoder(x)[:, : base.shape[1]])


class DeltaPretrainer(nnx.Module):
    """Stage 1 (Eq. 7-10): predict SigLIP tokens of step t from those of t-1 and the Δ of step t."""

    def __init__(self, config: DeltaEncoderConfig, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        self.config = config
        self.delta_encoder = DeltaEncoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=resolve_dtype(dtype), param_dtype=resolve_dtype(param_dtype), rngs=rngs)
        self.reference = TokenMixer(config, **kw)
        self.warped = TokenMixer(config, **kw)

    def __call__(self, prev_tokens: jax.Array, mv: jax.Array, residual: jax.Array) -> jax.Array:
        if prev_tokens.shape[-1] != self.config.width:
            raise ValueError(f"SigLIP width {prev_tokens.shape[-1]} != Δ-encoder width {self.config.width}")
        k = self.config.motion_queries
        delta = self.delta_encoder(mv, residual)
        moved = self.reference(prev_tokens, delta[:, :k])
        return self.warped(moved, delta[:, k:])

