"""Stage 1: Δ-encoder alignment (paper §3.3, App. B, C).

    python -m cope_jax.main --config=configs/pretrain.py:tiny --workdir /tmp/pretrain
    python -m cope_jax.main --config=configs/pretrain.py:paper --workdir gs://... \
        --config.data_dir=/data/primitives --config.siglip_checkpoint=/ckpt/llava-video-7b-jax

Variants: `tiny` (2-core CPU, minutes, built-in demo clips, small random SigLIP) and `paper`
(App. C: AdamW, cosine schedule, 1000 warmup steps, global batch 1024, the real Δ-encoder sizes).
Every field can be overridden with --config.<field>=<value>.
"""

import dataclasses

import ml_collections

from configs import common
from cope_jax.models.delta_encoder.modeling import DeltaEncoderConfig
from cope_jax.models.siglip.modeling import SiglipVisionConfig


def _common() -> ml_collections.ConfigDict:
    c = common.training_config("pretrain")
    c.demo_clips = 8
    c.eval_max_videos = 16
    c.evaluators = ("retrieval",)  # next-frame retrieval (paper App. H.6)
    c.warmup_steps = 100
    # Frozen SigLIP: a converted checkpoint (python -m cope_jax.convert) of SigLIP or of a whole
    # LLaVA-Video / CoPE model, whose 26-layer tower is used as the VLM uses it. Empty: a small
    # random tower built from `siglip` below (tiny runs only; the run says so).
    c.siglip_checkpoint = ""
    c.siglip = _fields(SiglipVisionConfig(image_size=64, patch_size=16, hidden_size=48, intermediate_size=96,
                                          num_hidden_layers=2, num_attention_heads=4, use_post_layernorm=False))
    # Δ-encoder: start the residual trunk from a converted ResNet-18 (python -m cope_jax.convert)
    # or from scratch (empty). Remat applies to its transformers and ResNet trunk; the frozen tower keeps nothing.
    c.resnet_checkpoint = ""
    return c


def _fields(config) -> ml_collections.ConfigDict:
    """A model config dataclass (nested ones included) as overridable config fields."""
    return ml_collections.ConfigDict(dataclasses.asdict(config))


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    c = _common()
    c.variant = variant
    if variant == "tiny":
        c.model = _fields(DeltaEncoderConfig.tiny())
        c.total_steps = 600  # about a minute on 2 CPU cores
        c.batch_size = 8
        c.learning_rate = 1e-3
        c.warmup_steps = 20
        c.checkpoint_every_steps = 200
        c.eval_every_steps = 200
        c.log_every_steps = 50
    elif variant == "paper":
        c.model = _fields(DeltaEncoderConfig.paper())
        c.siglip = _fields(SiglipVisionConfig.llava_video_tower())
        c.total_steps = 113_000  # App. C: 113K iterations
        c.batch_size = 1024
        # 256 pairs at a time: 32 per H100 of one node, 64 per chip of a v5litepod-4 (16 GB).
        c.grad_accum_steps = 4
        # App. C: "per-GPU learning rate 6.25e-5" on 16 GPUs; we read it as linearly scaled,
        # 16 x 6.25e-5 = 1e-3 for the global batch (set 6.25e-5 for the literal reading).
        c.learning_rate = 1e-3
        c.warmup_steps = 1000
        c.checkpoint_every_steps = 1000
        c.eval_every_steps = 2000
        c.log_every_steps = 50
        c.compute_dtype = "bfloat16"
        c.scan_layers = True
        c.remat = "layer"
        c.data_workers = 8
        c.mesh = common.mesh(common.FSDP_MESH)
    else:
        raise ValueError(f"configs/pretrain.py: unknown variant {variant!r} (choose tiny or paper)")
    return c
