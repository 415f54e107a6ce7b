"""CoPE-VideoLM: LLaVA-Video's keyframe path + Qwen2, with a slot for the Δ-encoder.

Keyframe path = LLaVA-NeXT "grid" semantics (`llava_arch.py`: `encode_images` -> `get_2dPool` ->
`add_token_per_grid`), not the HF LlavaOnevision port: SigLIP tower (last layer removed) ->
`mlp2x_gelu` projector -> 2x2 pooling of the patch grid -> `image_newline` after every row.
At 384 px: 27x27 patches -> 14x14 (bilinear) -> 14 rows x 15 = 210 tokens per keyframe.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cope_jax.models.common import linear, resolve_dtype
from cope_jax.models.qwen2.modeling import Qwen2Config, Qwen2ForCausalLM
from cope_jax.models.siglip.modeling import SiglipVisionConfig, SiglipVisionModel

POOL_MODES = ("bilinear", "average")


@dataclasses.dataclass(frozen=True)
class CoPEConfig:
    vision: SiglipVisionConfig = dataclasses.field(default_factory=SiglipVisionConfig.llava_video_tower)
    text: Qwen2Config = dataclasses.field(default_factory=Qwen2Config.qwen2_7b)
    pool_mode: str = "bilinear"  # LLaVA-Video-7B-Qwen2's mm_spatial_pool_mode
    pool_stride: int = 2

    def __post_init__(self):
        if self.pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES}, got {self.pool_mode!r}")
        if self.pool_stride < 1:
            raise ValueError(f"pool_stride must be >= 1, got {self.pool_stride}")

    @property
    def pooled_side(self) -> int:
        side = self.vision.patches_per_side
        # LLaVA-NeXT get_2dPool: bilinear resizes to ceil(side/stride); avg_pool2d floors.
        return math.ceil(side / self.pool_stride) if self.pool_mode == "bilinear" else side // self.pool_stride

    @property
    def tokens_per_keyframe(self) -> int:
        return self.pooled_side * (self.pooled_side + 1)  # each row followed by image_newline

    @classmethod
    def llava_video_7b(cls) -> "CoPEConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "CoPEConfig":
        return cls(vision=dataclasses.replace(SiglipVisionConfig.tiny(), use_post_layernorm=False),
                   text=Qwen2Config.tiny())

    @classmethod
    def from_dict(cls, d: dict) -> "CoPEConfig":
        return cls(vision=SiglipVisionConfig(**d["vision"]), text=Qwen2Config(**d["text"]),
                   pool_mode=d["pool_mode"], pool_stride=d["pool_stride"])


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PyTorch `interpolate(mode='bilinear', align_corners=False)`, no antialias.

    jax.image.resize antialiases when downsampling, which PyTorch's does not: build the exact
    sampling matrix instead.
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(src).astype(int), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = src - low
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), high), frac)
    return weights.astype(np.float32)


def pool_grid(grid: jax.Array, mode: str, stride: int) -> jax.Array:
    """[N,h,w,D] patch grid -> pooled grid, as LLaVA-NeXT get_2dPool."""
    if mode == "average":
        return nnx.avg_pool(grid, window_shape=(stride, stride), strides=(stride, stride), padding="VALID")
    h, w = grid.shape[1:3]
    rows = jnp.asarray(bilinear_matrix(h, math.ceil(h / stride)))
    cols = jnp.asarray(bilinear_matrix(w, math.ceil(w / stride)))
    return jnp.einsum("yh,nhwd,xw->nyxd", rows.astype(grid.dtype), grid, cols.astype(grid.dtype),
                      precision=jax.lax.Precision.HIGHEST)


class Projector(nnx.Module):
    """LLaVA `mlp2x_gelu`: Linear -> exact GELU -> Linear (LLaVA-NeXT names it mm_projector.0 / .2)."""

    def __init__(self, in_features: int, out_features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = linear(in_features, out_features, ("embed", "mlp"), **kw)
        self.linear_2 = linear(out_features, out_features, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


class CoPEVideoLM(nnx.Module):
    def __init__(self, config: CoPEConfig, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        dtype, param_dtype = resolve_dtype(dtype), resolve_dtype(param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision, **kw)
        self.mm_projector = Projector(config.vision.hidden_size, config.text.hidden_size, **kw)
        self.image_newline = nnx.Param(
            nnx.initializers.normal(1.0 / math.sqrt(config.text.hidden_size))(rngs.params(), (config.text.hidden_size,), param_dtype),
            logical_axes=("embed",))
        self.language_model = Qwen2ForCausalLM(config.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The Δ-encoder (motion + residual branches, paper §3.2) attaches here; until then P
        # steps cannot be encoded and the model is the dense LLaVA-Video baseline.
        self.delta_encoder = None

    def encode_keyframes(self, frames: jax.Array) -> jax.Array:
        """frames float32[N,H,W,3] normalised -> [N, tokens_per_keyframe, D_llm], newlines included."""
        cfg = self.config
        features = self.mm_projector(self.vision_tower(frames))  # [N,P,D]
        side = cfg.vision.patches_per_side
        grid = pool_grid(features.reshape(features.shape[0], side, side, -1), cfg.pool_mode, cfg.pool_stride)
        n, rows, _, d = grid.shape
        newline = jnp.broadcast_to(self.image_newline[...].astype(grid.dtype), (n, rows, 1, d))
        return jnp.concatenate([grid, newline], axis=2).reshape(n, -1, d)
