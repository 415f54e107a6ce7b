"""Stage 2: end-to-end instruction tuning of CoPE-VideoLM (paper §3.3 "Integration into VideoLMs", App. C).

    python -m cope_jax.main --config=configs/finetune.py:tiny --workdir /tmp/finetune      # the whole demo pipeline
    python -m cope_jax.main --config=configs/finetune.py:paper --workdir /runs/cope-7b \
        --config.init_checkpoint=/ckpt/llava-video-7b-jax --config.delta_checkpoint=/runs/pretrain \
        --config.annotations=/data/llava_video_178k.yaml --config.data_dir=/data/primitives

Variants: `tiny` (2-core CPU, minutes: demo clips whose questions need motion, stage 1 first, a
tiny random CoPE, then held-out accuracy of Δ-tokens vs none) and `paper` (LLaVA-Video-7B with
LLaVA-Video's fine-tuning settings). Every field can be overridden with --config.<field>=<value>;
`--mode=print_config` shows the resolved config.
"""

import dataclasses

import ml_collections

from configs import common
from configs import pretrain as pretrain_configs
from cope_jax import sharding
from cope_jax.models.cope.modeling import CoPEConfig


def _common() -> ml_collections.ConfigDict:
    c = common.training_config("finetune")
    # LLaVA-Video-178K annotations: a .json list, a .jsonl, LLaVA's YAML mixture, or a list of
    # them. Empty (with an empty data_dir): the built-in demo questions under <workdir>/demo_data.
    c.annotations = ""  # data_dir: the preprocessing output the annotations' videos were turned into
    c.demo_clips = 160  # built-in demo: clips for training
    c.demo_eval_clips = 40  # ... and held out for the accuracy table
    # Weights. init_checkpoint: a converted LLaVA-Video or a CoPE checkpoint (cope_jax.convert);
    # empty: a random model from `model` (tiny only). delta_checkpoint: a stage-1 workdir or a
    # checkpoint holding a Δ-encoder; empty: the init checkpoint's (random if it has none; paper H.2).
    c.init_checkpoint = ""
    c.delta_checkpoint = ""
    # Run stage 1 (config `pretrain`) in <workdir>/pretrain on the same data first and take its
    # Δ-encoder (and its tower, when that is random): the built-in pipeline of `make run`.
    c.run_pretrain = False
    c.pretrain = pretrain_configs.get_config("tiny")
    # What the LLM reads (docs/architecture.md §7 switches; App. C trains with 4 keyframes + 4 P steps per GOP).
    c.keyframes_per_gop = 4
    c.max_gops = 64
    c.time_instruction = "full"  # full (LLaVA-Video's, every step's time) | duration | none
    # Token budget per sample (visual + text, counted before batching); over it, GOPs are dropped
    # uniformly, never assistant text. Sequences are padded to the smallest bucket that fits.
    c.max_seq_len = 16384
    c.length_buckets = (4096, 8192, 16384)
    c.batch_size = 128
    c.grad_accum_steps = 1  # 0: one row per device at a time (batch_size / data x fsdp devices micro-batches)
    c.eval_every_steps = 0
    c.evaluators = ("demo_accuracy",)  # held-out accuracy on the built-in demo (nothing on other data)
    # Optimisation (LLaVA-Video: AdamW, warmup ratio 0.03, cosine, no weight decay).
    c.learning_rate = 1e-5  # every trainable parameter no `learning_rates` entry matches
    # The paper calls the tower frozen (§3.2, Fig. 2) yet fine-tunes "the full VideoLM" (§4.1): we
    # follow LLaVA-Video, the tower trained at 2e-6; frozen=["^vision_tower/"] freezes it instead.
    c.learning_rates = [("^vision_tower/", 2e-6)]  # (regex over "a/b/c" parameter paths, rate); first match wins
    c.trainable = [".*"]  # regexes (re.search) of the parameters that train ...
    c.frozen = []  # ... minus these; frozen parameters carry no optimizer state
    c.warmup_ratio = 0.03
    c.weight_decay = 0.0
    c.compute_dtype = "bfloat16"
    c.loss_chunk = 1024  # sequence positions per logits chunk of the loss ([B,T,V] is never built)
    c.mesh = common.mesh(common.FSDP_MESH)
    # The model when init_checkpoint is empty (a random CoPE-VideoLM; its tower follows stage 1's).
    c.model = ml_collections.ConfigDict(dataclasses.asdict(CoPEConfig.tiny()))
    c.eval_max_questions = 0  # held-out questions for the accuracy table (0: all)
    c.eval_delta_modes = ("cope", "zero", "keyframes_only")  # paper H.3 / H.4
    return c


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    c = _common()
    c.variant = variant
    if variant == "tiny":
        c.run_pretrain = True
        c.pretrain.total_steps = 400
        c.pretrain.checkpoint_every_steps = 200
        c.pretrain.eval_every_steps = 400
        c.keyframes_per_gop = 1  # one keyframe alone cannot tell which way things move
        c.max_gops = 4
        c.max_seq_len = 512
        c.length_buckets = (256, 384, 512)
        c.total_steps = 300
        c.batch_size = 8
        c.learning_rate = 3e-3
        c.learning_rates = []
        c.frozen = ["^vision_tower/"]  # the random demo tower is only a target for stage 1
        c.warmup_ratio = 0.05
        c.checkpoint_every_steps = 100
        c.log_every_steps = 25
        c.compute_dtype = "float32"
        c.mesh = common.mesh(sharding.DEFAULT_MESH_SHAPE)
        c.loss_chunk = 512
    elif variant == "paper":
        c.model = ml_collections.ConfigDict(dataclasses.asdict(CoPEConfig.llava_video_7b()))
        # App. C: 1.39M samples of LLaVA-Video-178K at global batch 128 is ~10.9K steps an epoch.
        c.total_steps = 10_900
        c.batch_size = 128
        # One row per device at a time (128 / devices micro-batches): the 16,384-token bucket with its 72
        # keyframes and 72 P steps per row fits an 8-GPU node (BENCHMARKS.md, compiled memory plan).
        c.grad_accum_steps = 0
        c.remat = "layer"
        c.scan_layers = True
        c.data_workers = 8
        c.checkpoint_every_steps = 500
        c.log_every_steps = 10
    else:
        raise ValueError(f"configs/finetune.py: unknown variant {variant!r} (choose tiny or paper)")
    return c
