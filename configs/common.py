"""The fields both training stages' configs share, with their defaults and meaning written once.

`training_config(stage)` starts configs/pretrain.py and configs/finetune.py; each then adds its own
fields and overrides the defaults that differ. Every field can be overridden with --config.<field>=<value>.
"""

import ml_collections

from cope_jax import sharding

# Weights and batches over every device with FSDP (the 7B recipes); the default mesh is sharding's.
FSDP_MESH = {"data": 1, "fsdp": -1, "tensor": 1}


def mesh(shape: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(shape))


def training_config(stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.variant = ""
    c.seed = 0
    # Preprocessing output (python -m data_pipeline.preprocess). Empty: demo clips are generated
    # and preprocessed under <workdir>/demo_data.
    c.data_dir = ""
    c.total_steps = 1000
    c.batch_size = 8  # global, over all processes and accumulation steps
    # Micro-batches per step, their gradients summed in one scan (same update, less memory).
    c.grad_accum_steps = 1
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 3
    c.log_every_steps = 10
    c.eval_every_steps = 100  # 0: only at the end
    c.evaluators = ()  # cope_jax.evaluation names, run every eval_every_steps and at the end
    c.data_workers = 0  # grain worker processes per host (0: in the training process)
    c.record_data_order = False  # append each step's examples to <workdir>/data_order.jsonl
    # Optimisation: AdamW, linear warmup then cosine decay, one global-norm clip.
    c.learning_rate = 1e-4
    c.weight_decay = 0.05
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.grad_clip_norm = 1.0
    c.compute_dtype = "float32"  # or "bfloat16": activations and matmuls; master weights and optimizer state stay float32
    # Attention kernels: "auto" takes the platform's (TPU: Pallas splash; GPU: cuDNN in bf16; CPU: direct or
    # chunked by length); "xla", "chunked", "cudnn" or "splash" force one wherever it applies.
    c.attention = "auto"
    # One scan over each layer stack instead of unrolled layers: compile time independent of depth, FSDP
    # weights gathered per layer in the compute dtype (same results).
    c.scan_layers = False
    # Activation remat per layer of the trained stacks: "none", "layer" (recompute all in the backward
    # pass), "dots" (keep matmul outputs).
    c.remat = "none"
    # Mesh axis sizes; -1 takes the remaining devices. Batches split over data x fsdp; weights
    # over fsdp (and tensor) by their logical axis names.
    c.mesh = mesh(sharding.DEFAULT_MESH_SHAPE)
    # Logical axis name -> mesh axes (a name, a list of names, or None = replicated). Every weight
    # carries logical names (embed, mlp, heads, conv_in, conv_out, ...); `batch` names the batch's axes.
    c.logical_rules = ml_collections.ConfigDict({logical: axes for logical, axes in sharding.DEFAULT_RULES})
    return c
