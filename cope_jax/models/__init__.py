"""Model registry: a stable kind name per model, used by checkpoints to rebuild the module."""

from __future__ import annotations

import dataclasses

from cope_jax.models.cope.modeling import CoPEConfig, CoPEVideoLM
from cope_jax.models.delta_encoder.modeling import DeltaEncoder, DeltaEncoderConfig
from cope_jax.models.qwen2.modeling import Qwen2Config, Qwen2ForCausalLM
from cope_jax.models.resnet.modeling import ResNet, ResNetConfig
from cope_jax.models.siglip.modeling import SiglipVisionConfig, SiglipVisionModel

KINDS = {
    "qwen2": (Qwen2ForCausalLM, Qwen2Config),
    "siglip_vision": (SiglipVisionModel, SiglipVisionConfig),
    "resnet": (ResNet, ResNetConfig),
    "cope": (CoPEVideoLM, CoPEConfig),
    "delta_encoder": (DeltaEncoder, DeltaEncoderConfig),
}


def kind_of(module) -> str:
    for kind, (module_class, _) in KINDS.items():
        if isinstance(module, module_class):
            return kind
    raise TypeError(f"no registered model kind for {type(module).__name__}")


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(kind: str, d: dict):
    config_class = KINDS[kind][1]
    if hasattr(config_class, "from_dict"):
        return config_class.from_dict(d)
    return config_class(**d)
