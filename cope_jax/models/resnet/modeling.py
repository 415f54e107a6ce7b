"""BasicBlock ResNet trunk (ResNet-18 layout) in Flax NNX, NHWC.

Attribute names mirror torchvision's `resnet18` (conv1, bn1, layer1..4 -> `stages`, downsample);
HF `ResNetModel` weights map onto the same tree. Output = the last stage's feature map, as HF
`ResNetModel.last_hidden_state` (no pooling, no classifier).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cope_jax.models.common import layer_runner, resolve_dtype
from cope_jax.sharding import constrain_rows, initializer


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (2, 2, 2, 2)  # one entry per stage: fewer entries = fewer stages
    downsample_in_first_stage: bool = False
    batch_norm_eps: float = 1e-5
    batch_norm_momentum: float = 0.9  # flax convention: running = m * running + (1 - m) * batch

    @classmethod
    def resnet18(cls) -> "ResNetConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "ResNetConfig":
        return cls(embedding_size=8, hidden_sizes=(8, 16), depths=(1, 2))

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        object.__setattr__(self, "depths", tuple(self.depths))
        if len(self.hidden_sizes) != len(self.depths) or not self.depths:
            raise ValueError(f"hidden_sizes {self.hidden_sizes} and depths {self.depths} must be non-empty and of equal length")


def _conv(in_ch, out_ch, kernel, stride, *, dtype, param_dtype, rngs):
    pad = kernel // 2  # PyTorch's explicit symmetric padding
    return nnx.Conv(in_ch, out_ch, kernel_size=(kernel, kernel), strides=(stride, stride),
                    padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=initializer(nnx.initializers.kaiming_normal(), (None, None, "conv_in", "conv_out")),
                    rngs=rngs)


def _batch_norm(features, config: ResNetConfig, *, dtype, param_dtype, rngs):
    # Inference mode by default (parity with PyTorch eval); `model.train()` switches to batch stats.
    return nnx.BatchNorm(features, use_running_average=True, momentum=config.batch_norm_momentum,
                         epsilon=config.batch_norm_eps, dtype=dtype, param_dtype=param_dtype,
                         scale_init=initializer(nnx.initializers.ones_init(), ("conv_out",)),
                         bias_init=initializer(nnx.initializers.zeros_init(), ("conv_out",)), rngs=rngs)


class Downsample(nnx.Module):
    def __init__(self, in_ch, out_ch, stride, config, **kw):
        self.conv = _conv(in_ch, out_ch, 1, stride, **kw)
        self.bn = _batch_norm(out_ch, config, **kw)

    def __call__(self, x):
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    def __init__(self, in_ch, out_ch, stride, config: ResNetConfig, **kw):
        self.conv1 = _conv(in_ch, out_ch, 3, stride, **kw)
        self.bn1 = _batch_norm(out_ch, config, **kw)
        self.conv2 = _conv(out_ch, out_ch, 3, 1, **kw)
        self.bn2 = _batch_norm(out_ch, config, **kw)
        needs_projection = in_ch != out_ch or stride != 1
        self.downsample = Downsample(in_ch, out_ch, stride, config, **kw) if needs_projection else None

    def __call__(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        return jax.nn.relu(self.bn2(self.conv2(y)) + shortcut)


class ResNet(nnx.Module):
    """x float32[B,H,W,C] -> feature map [B,h,w,C'] (HF ResNetModel.last_hidden_state, NHWC)."""

    def __init__(self, config: ResNetConfig, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        kw = dict(dtype=resolve_dtype(dtype), param_dtype=resolve_dtype(param_dtype), rngs=rngs)
        self.config = config
        self.conv1 = _conv(config.num_channels, config.embedding_size, 7, 2, **kw)
        self.bn1 = _batch_norm(config.embedding_size, config, **kw)
        stages, in_ch = [], config.embedding_size
        for index, (width, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
            first_stride = 2 if (index > 0 or config.downsample_in_first_stage) else 1
            blocks = []
            for block_index in range(depth):
                blocks.append(BasicBlock(in_ch, width, first_stride if block_index == 0 else 1, config, **kw))
                in_ch = width
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.remat = "none"  # per block when trained (`common.set_remat`); not in the config, so checkpoints never store it

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.config.num_channels:
            raise ValueError(f"ResNet expects NHWC input with {self.config.num_channels} channels, got shape {x.shape}")
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        run = layer_runner(self.remat, lambda block, h: constrain_rows(block(constrain_rows(h))))
        for stage in self.stages:
            for block in stage:
                x = run(block, x)
        return x
