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

from cope_jax import sharding
from cope_jax.models.delta_encoder.modeling import DeltaEncoderConfig
from cope_jax.models.siglip.modeling import SiglipVisionConfig


def _common() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "pretrain"
    c.variant = ""
    c.seed = 0
    # Preprocessing output (python -m data_pipeline.preprocess). Empty: demo clips are generated
    # and preprocessed under <workdir>/demo_data.
    c.data_dir = ""
    c.demo_clips = 8
    c.total_steps = 1000
    c.batch_size = 8  # global, over all processes
    # Micro-batches per step, their gradients summed in one scan (same update, less memory).
    c.grad_accum_steps = 1
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 3
    c.eval_every_steps = 100
    c.log_every_steps = 10
    c.eval_max_videos = 16
    c.data_workers = 0  # grain worker processes per host (0: in the training process)
    c.record_data_order = False  # append each step's (video, step) pairs to <workdir>/data_order.jsonl
    c.learning_rate = 1e-4
    c.warmup_steps = 100
    c.weight_decay = 0.05
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.grad_clip_norm = 1.0
    c.compute_dtype = "float32"  # or "bfloat16": activations and matmuls; weights stay float32
    # Attention kernels: "auto" takes the platform's (TPU: Pallas splash; GPU: cuDNN in bf16; CPU: direct or
    # chunked by length); "xla", "chunked", "cudnn" or "splash" force one wherever it applies.
    c.attention = "auto"
    # One scan over each layer stack instead of unrolled layers: compile time independent of depth, FSDP
    # weights gathered per layer in the compute dtype (same results).
    c.scan_layers = False
    # Activation remat per layer of the Δ-encoder's transformers and ResNet trunk: "none", "layer"
    # (recompute all in the backward pass), "dots" (keep matmul outputs). The frozen tower keeps nothing.
    c.remat = "none"
    # Mesh axis sizes; -1 takes the remaining devices. Batches split over data x fsdp; weights
    # over fsdp (and tensor) by their logical axis names.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    # Logical axis name -> mesh axes (a name, a list of names, or None = replicated). Every weight
    # carries logical names (embed, mlp, heads, conv_in, conv_out, ...).
    c.logical_rules = ml_collections.ConfigDict({logical: axes for logical, axes in sharding.DEFAULT_RULES})
    # Frozen SigLIP: a converted checkpoint (python -m cope_jax.convert) of SigLIP or of a whole
    # LLaVA-Video / CoPE model, whose 26-layer tower is used as the VLM uses it. Empty: a small
    # random tower built from `siglip` below (tiny runs only; the run says so).
    c.siglip_checkpoint = ""
    c.siglip = _fields(SiglipVisionConfig(image_size=64, patch_size=16, hidden_size=48, intermediate_size=96,
                                          num_hidden_layers=2, num_attention_heads=4, use_post_layernorm=False))
    # Δ-encoder: start the residual trunk from a converted ResNet-18 (python -m cope_jax.convert)
    # or from scratch (empty).
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
        c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    else:
        raise ValueError(f"configs/pretrain.py: unknown variant {variant!r} (choose tiny or paper)")
    return c
