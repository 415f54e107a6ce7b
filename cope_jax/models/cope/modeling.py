"""CoPE-VideoLM: LLaVA-Video's keyframe path + the Δ-encoder + Qwen2 (paper §3.2, docs/architecture.md §4, §7).

Keyframe path = LLaVA-NeXT "grid" semantics (`llava_arch.py`: `encode_images` -> `get_2dPool` ->
`add_token_per_grid`), not the HF LlavaOnevision port: SigLIP tower (last layer removed) ->
`mlp2x_gelu` projector -> 2x2 pooling of the patch grid -> `image_newline` after every row.
At 384 px: 27x27 patches -> 14x14 (bilinear) -> 14 rows x 15 = 210 tokens per keyframe.

P step (paper Eq. 2, Tab. H.5): DeltaEncoder(mv, residual) -> 8 tokens in SigLIP space -> the same
projector -> (4 motion tokens, newline, 4 residual tokens, newline) = 10 tokens.

A video is a stream of both, in time order (`encode_video`): every keyframe of a batch goes through
SigLIP in one call, every P step through the Δ-encoder in one call, and one gather by precomputed
source index (`cope_jax.video.stream`) puts each token in place, so shapes are static and
videos of different lengths batch behind a mask.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cope_jax.models.common import linear, resolve_dtype
from cope_jax.models.delta_encoder.modeling import DeltaEncoder, DeltaEncoderConfig
from cope_jax.models.qwen2.modeling import Qwen2Config, Qwen2ForCausalLM
from cope_jax.models.siglip.modeling import SiglipVisionConfig, SiglipVisionModel

POOL_MODES = ("bilinear", "average")
# delta_mode (docs/architecture.md §7): "cope" = Δ-tokens as trained; "zero" = Δ-tokens zeroed at the Δ-encoder
# output, structure kept (paper App. H.3); "keyframes_only" = P steps dropped from the plan (H.4).
DELTA_MODES = ("cope", "zero", "keyframes_only")


@dataclasses.dataclass(frozen=True)
class CoPEConfig:
    vision: SiglipVisionConfig = dataclasses.field(default_factory=SiglipVisionConfig.llava_video_tower)
    text: Qwen2Config = dataclasses.field(default_factory=Qwen2Config.qwen2_7b)
    pool_mode: str = "bilinear"  # LLaVA-Video-7B-Qwen2's mm_spatial_pool_mode
    pool_stride: int = 2
    # Δ-tokens live in the tower's feature space (paper §3.3): same width, same frame size.
    delta: DeltaEncoderConfig = dataclasses.field(default_factory=DeltaEncoderConfig.paper)

    def __post_init__(self):
        if self.pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES}, got {self.pool_mode!r}")
        if self.pool_stride < 1:
            raise ValueError(f"pool_stride must be >= 1, got {self.pool_stride}")
        check_delta_fits_tower(self.delta, self.vision)

    @property
    def pooled_side(self) -> int:
        side = self.vision.patches_per_side
        # LLaVA-NeXT get_2dPool: bilinear resizes to ceil(side/stride); avg_pool2d floors.
        return math.ceil(side / self.pool_stride) if self.pool_mode == "bilinear" else side // self.pool_stride

    @property
    def tokens_per_keyframe(self) -> int:
        return self.pooled_side * (self.pooled_side + 1)  # each row followed by image_newline

    @property
    def tokens_per_p_step(self) -> int:
        return self.delta.num_tokens + 2  # two rows (motion, residual), each followed by image_newline

    @classmethod
    def llava_video_7b(cls) -> "CoPEConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "CoPEConfig":
        vision = dataclasses.replace(SiglipVisionConfig.tiny(), use_post_layernorm=False)
        return cls(vision=vision, text=Qwen2Config.tiny(), delta=tiny_delta_for_tower(vision))

    @classmethod
    def from_dict(cls, d: dict) -> "CoPEConfig":
        vision = SiglipVisionConfig(**d["vision"])
        delta = DeltaEncoderConfig.from_dict(d["delta"]) if d.get("delta") else delta_for_tower(vision)
        return cls(vision=vision, text=Qwen2Config(**d["text"]), pool_mode=d["pool_mode"],
                   pool_stride=d["pool_stride"], delta=delta)


def check_delta_fits_tower(delta: DeltaEncoderConfig, vision: SiglipVisionConfig) -> None:
    if (delta.width, delta.image_size) != (vision.hidden_size, vision.image_size):
        raise ValueError(f"Δ-encoder (width {delta.width}, {delta.image_size} px) does not fit the vision tower "
                         f"(width {vision.hidden_size}, {vision.image_size} px): Δ-tokens must live in the tower's "
                         "feature space (paper §3.3)")


def delta_for_tower(vision: SiglipVisionConfig) -> DeltaEncoderConfig:
    """The paper's Δ-encoder (App. B) at a tower's width and frame size; where the paper's 16 px
    motion patches or 9 heads do not divide that size (small test towers), the tower's own."""
    paper = DeltaEncoderConfig.paper()
    patch = paper.patch_size if vision.image_size % paper.patch_size == 0 else vision.patch_size
    heads = paper.num_heads if vision.hidden_size % paper.num_heads == 0 else vision.num_attention_heads
    return dataclasses.replace(paper, image_size=vision.image_size, width=vision.hidden_size, patch_size=patch,
                               num_heads=heads)


def tiny_delta_for_tower(vision: SiglipVisionConfig) -> DeltaEncoderConfig:
    """DeltaEncoderConfig.tiny() at a tower's width and frame size."""
    return dataclasses.replace(delta_for_tower(vision), depth=1, resnet=DeltaEncoderConfig.tiny().resnet)


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
        self.delta_encoder = DeltaEncoder(config.delta, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def encode_keyframes(self, frames: jax.Array) -> jax.Array:
        """frames float32[N,H,W,3] normalised -> [N, tokens_per_keyframe, D_llm], newlines included."""
        cfg = self.config
        features = self.mm_projector(self.vision_tower(frames))  # [N,P,D]
        side = cfg.vision.patches_per_side
        grid = pool_grid(features.reshape(features.shape[0], side, side, -1), cfg.pool_mode, cfg.pool_stride)
        n, rows, _, d = grid.shape
        newline = jnp.broadcast_to(self.image_newline[...].astype(grid.dtype), (n, rows, 1, d))
        return jnp.concatenate([grid, newline], axis=2).reshape(n, -1, d)

    def encode_p_steps(self, mv: jax.Array, residual: jax.Array, zero_delta: bool = False) -> jax.Array:
        """mv float32[P,H,W,2], residual [P,H,W,3] -> [P, tokens_per_p_step, D_llm]: the 8 Δ-tokens
        through the projector as two rows, (motion tokens, newline) then (residual tokens, newline).

        `zero_delta` zeroes the Δ-encoder's output before the projector (paper App. H.3)."""
        delta = self.delta_encoder(mv, residual)  # [P, Kτ+Kδ, d]
        if zero_delta:
            delta = jnp.zeros_like(delta)
        tokens = self.mm_projector(delta)  # [P, Kτ+Kδ, D]
        p, _, d = tokens.shape
        newline = jnp.broadcast_to(self.image_newline[...].astype(tokens.dtype), (p, 1, d))
        motion, residual_rows = jnp.split(tokens, [self.config.delta.motion_queries], axis=1)
        return jnp.concatenate([motion, newline, residual_rows, newline], axis=1)

    def encode_video(self, keyframes: jax.Array, mv: jax.Array, residual: jax.Array, token_source: jax.Array,
                     zero_delta: bool = False) -> jax.Array:
        """The visual token stream of a batch of videos (docs/architecture.md §7).

        keyframes uint8 or normalised float [K,H,W,3] (every keyframe of the batch), mv [P,H,W,2] and
        residual [P,H,W,3] (every P step), token_source int32 [B,L] (`video.stream`: index into
        the keyframe tokens, then the P-step tokens, then one zero row for padding) -> [B,L,D_llm].
        """
        return assemble_stream(self.keyframe_token_table(keyframes), self.p_step_token_table(mv, residual, zero_delta),
                               token_source)

    def encode_videos(self, keyframes: jax.Array, mv: jax.Array, residual: jax.Array, token_source: jax.Array,
                      zero_delta: bool = False) -> jax.Array:
        """Per-video layout of `encode_video` (what training batches and shards along B).

        keyframes [B,Ks,H,W,3], mv [B,Ps,H,W,2], residual [B,Ps,H,W,3] (each video's padded slots),
        token_source int32 [B,L] indexing that video's own table: its Ks * tokens_per_keyframe
        keyframe tokens, then its Ps * tokens_per_p_step P-step tokens, then one zero row
        (`video.stream.video_batch` of that video alone) -> [B,L,D_llm]. Every frame of the
        batch still goes through SigLIP, and every P step through the Δ-encoder, in one call."""
        b, d = keyframes.shape[0], self.config.text.hidden_size
        key_table = self.keyframe_token_table(keyframes.reshape(-1, *keyframes.shape[2:])).reshape(b, -1, d)
        p_table = self.p_step_token_table(mv.reshape(-1, *mv.shape[2:]), residual.reshape(-1, *residual.shape[2:]),
                                          zero_delta).reshape(b, -1, d)
        dtype = jnp.result_type(key_table.dtype, p_table.dtype)
        table = jnp.concatenate([key_table.astype(dtype), p_table.astype(dtype), jnp.zeros((b, 1, d), dtype)], axis=1)
        return jnp.take_along_axis(table, token_source[..., None], axis=1)

    def keyframe_token_table(self, keyframes: jax.Array) -> jax.Array:
        """[K,H,W,3] -> [K * tokens_per_keyframe, D_llm] (empty when K = 0)."""
        d = self.config.text.hidden_size
        if keyframes.shape[0] == 0:
            return jnp.zeros((0, d), self.language_model.dtype)
        if keyframes.dtype == jnp.uint8:
            keyframes = normalize_frames(keyframes)
        return self.encode_keyframes(keyframes).reshape(-1, d)

    def p_step_token_table(self, mv: jax.Array, residual: jax.Array, zero_delta: bool = False) -> jax.Array:
        """[P,H,W,2], [P,H,W,3] -> [P * tokens_per_p_step, D_llm] (empty when P = 0)."""
        d = self.config.text.hidden_size
        if mv.shape[0] == 0:
            return jnp.zeros((0, d), self.language_model.dtype)
        return self.encode_p_steps(mv, residual, zero_delta).reshape(-1, d)

    def merge_visual(self, input_ids: jax.Array, is_visual: jax.Array, visual: jax.Array) -> jax.Array:
        """Token ids int32[B,T] whose `is_visual` slots take the visual stream [B,L,D] in order -> [B,T,D].

        The j-th visual slot of a row takes visual[b, j] (a cumsum over the mask, so every shape stays static), so the
        text around it can be padded or bucketed freely."""
        lm = self.language_model
        text = lm.embed(jnp.where(is_visual, 0, input_ids))
        index = jnp.maximum(jnp.cumsum(is_visual, axis=1) - 1, 0)  # [B,T]
        visual_at = jnp.take_along_axis(visual, index[..., None], axis=1)
        return jnp.where(is_visual[..., None], visual_at.astype(text.dtype), text)


def assemble_stream(keyframe_tokens: jax.Array, p_step_tokens: jax.Array, token_source: jax.Array) -> jax.Array:
    """[NK*Tk, D] and [NP*Tp, D] token tables + int32 [B,L] source indices -> [B,L,D]; index
    NK*Tk + NP*Tp is an all-zero padding row."""
    dtype = jnp.result_type(keyframe_tokens.dtype, p_step_tokens.dtype)
    padding = jnp.zeros((1, keyframe_tokens.shape[-1]), dtype)
    table = jnp.concatenate([keyframe_tokens.astype(dtype), p_step_tokens.astype(dtype), padding], axis=0)
    return table[token_source]


def normalize_frames(frames: jax.Array) -> jax.Array:
    """uint8 [N,H,W,3] -> the SigLIP processor's normalisation ((x/255 - 0.5)/0.5), float32."""
    return (frames.astype(jnp.float32) / 255.0 - 0.5) / 0.5
