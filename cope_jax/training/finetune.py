"""Stage 2: end-to-end instruction tuning of CoPE-VideoLM (paper §3.3 "Integration into VideoLMs",
App. C; docs/architecture.md §8).

The whole VideoLM reads the interleaved keyframe + Δ-token stream of each video and learns by
next-token loss on the assistant's tokens only. This module supplies the stage to the shared loop
(`training.loop`): the model (a converted LLaVA-Video / CoPE checkpoint, or a random tiny one), the
data (`training.instruct`), the loss, and at the end a CoPE checkpoint in <workdir>/model/. Which
parameters train and at what rates is `training.optimization`'s; the held-out accuracy of the demo
is an evaluator (`cope_jax.evaluation`). With config.run_pretrain, stage 1 runs first on the same
data (`train`).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from cope_jax import checkpoints, sharding
from cope_jax.errors import ConfigError
from cope_jax.models.attention import set_attention
from cope_jax.models.common import set_remat, set_scan_layers
from cope_jax.models.cope.modeling import CoPEConfig, CoPEVideoLM
from cope_jax.models.delta_encoder.modeling import parameter_count
from cope_jax.training import checks, demo, instruct, loop, optimization, pretrain
from cope_jax.training.loop import log
from cope_jax.video.settings import VideoSettings
from cope_jax.video.switches import DELTA_MODES
from cope_jax.video.tokenizer import chatml_tokenizer, load_tokenizer
from data_pipeline import codec, records

MODEL_DIR = "model"
STAGE1_DIR = "pretrain"


def check_config(config) -> None:
    """Every problem of the config at once, in one line (nothing is written before this passes)."""
    problems = checks.problems(config, checks.POSITIVE + ("max_seq_len", "loss_chunk", "keyframes_per_gop", "max_gops"))
    if not isinstance(config.grad_accum_steps, int) or config.grad_accum_steps < 0:
        problems.append(f"config.grad_accum_steps must be >= 0 (0: one row per device at a time), got {config.grad_accum_steps!r}")
    elif isinstance(config.batch_size, int) and config.grad_accum_steps > 0 and config.batch_size % config.grad_accum_steps:
        problems.append(f"config.batch_size {config.batch_size} is not divisible by config.grad_accum_steps "
                        f"{config.grad_accum_steps}")
    if not 0 <= config.warmup_ratio < 1:
        problems.append(f"config.warmup_ratio must be in [0, 1), got {config.warmup_ratio!r}")
    buckets = list(config.length_buckets)
    if not buckets or any(not isinstance(b, int) or b <= 0 for b in buckets):
        problems.append(f"config.length_buckets must be positive token counts, got {buckets!r}")
    elif max(buckets) < config.max_seq_len:
        problems.append(f"config.length_buckets {buckets}: the largest must be >= config.max_seq_len {config.max_seq_len}")
    problems += [f"config.eval_delta_modes: unknown mode {mode!r} ({', '.join(DELTA_MODES)})"
                 for mode in config.eval_delta_modes if mode not in DELTA_MODES]
    problems += [f"config.{field} {config[field]}: no such directory" for field in ("init_checkpoint", "delta_checkpoint", "data_dir")
                 if config[field] and not os.path.isdir(os.path.expanduser(config[field]))]
    if bool(config.annotations) != bool(config.data_dir):
        problems.append("config.annotations and config.data_dir go together (both empty: the built-in demo data)")
    if config.run_pretrain and config.delta_checkpoint:
        problems.append("config.run_pretrain and config.delta_checkpoint exclude each other (one source of the Δ-encoder)")
    checks.check(problems)


# ---------------------------------------------------------------------------- model


def build_model(config, workdir: str, mesh, rules, compute):
    """-> (model on the mesh, tokenizer, {"source", ...} of its Δ-encoder or None)."""
    delta_path = os.path.join(workdir, STAGE1_DIR) if config.run_pretrain else config.delta_checkpoint
    if config.init_checkpoint:
        model, tokenizer = from_checkpoint(config.init_checkpoint, mesh, rules, compute)
    else:
        model, tokenizer = random_model(config, delta_path, mesh, rules, compute)
    delta_info = None
    if delta_path:
        encoder, delta_info = checkpoints.load_delta_encoder(delta_path)
        if encoder.config != model.config.delta:
            raise ConfigError(f"{delta_path}: its Δ-encoder {encoder.config} does not match the model's "
                              f"{model.config.delta}")
        nnx.update(model.delta_encoder, nnx.state(encoder))
        sharding.reshard(model, mesh, rules)
    elif not (config.init_checkpoint and not checkpoints.read_meta(config.init_checkpoint).get("delta_encoder", {}).get("random", True)):
        log("NOTE: no trained Δ-encoder (config.delta_checkpoint is empty): it starts RANDOM, the one-stage setting "
            "of paper App. H.2, which trains worse than starting from stage 1")
    return model, tokenizer, delta_info


def from_checkpoint(path: str, mesh, rules, compute):
    path = os.path.expanduser(path)
    meta = checkpoints.read_meta(path)
    if meta["kind"] != "cope":
        raise ConfigError(f"config.init_checkpoint {path}: holds a {meta['kind']} model, not LLaVA-Video / CoPE "
                          "(convert LLaVA-Video-7B-Qwen2 with python -m cope_jax.convert)")
    model = checkpoints.load(path, mesh=mesh, rules=rules, dtype=compute, param_dtype="float32")
    return model, load_tokenizer(path)


def random_model(config, delta_path: str, mesh, rules, compute):
    """A random CoPE-VideoLM from config.model; with a stage-1 workdir whose tower was random,
    that same tower (rebuilt from its config and seed), so Δ-tokens live in its feature space."""
    try:
        model_config = CoPEConfig.from_dict(config.model.to_dict())
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config.model: {e}") from None
    tower = None
    if delta_path:
        stage1 = checkpoints.read_stage1_config(delta_path)
        tower = pretrain.build_siglip(stage1, compute, quiet=True)
        model_config = dataclasses.replace(model_config, vision=tower.config, delta=checkpoints.stage1_delta_config(stage1))
    tokenizer = chatml_tokenizer(model_config.text.vocab_size)
    if len(tokenizer) > model_config.text.vocab_size:
        raise ConfigError(f"config.model.text.vocab_size {model_config.text.vocab_size} < the tokenizer's {len(tokenizer)}")
    log("NOTE: config.init_checkpoint is empty: a RANDOM tiny CoPE-VideoLM with a locally built tokenizer (demo only)")
    model = sharding.create_sharded(lambda: CoPEVideoLM(model_config, dtype=compute, param_dtype="float32",
                                                        rngs=nnx.Rngs(config.seed)), mesh, rules)
    if tower is not None:
        nnx.update(model.vision_tower, nnx.state(tower))
        sharding.reshard(model, mesh, rules)
    return model, tokenizer


# ---------------------------------------------------------------------------- loss


def loss_sums(model: CoPEVideoLM, batch: dict, *, remat: str, chunk: int, zero_delta: bool = False):
    """(summed cross-entropy over supervised tokens, their count) for one micro-batch."""
    visual = model.encode_videos(batch["keyframes"], batch["mv"], batch["residual"], batch["token_source"], zero_delta)
    embeds = model.merge_visual(batch["ids"], batch["is_visual"], visual)
    # Right padding: causality alone keeps it from real tokens, so the attention stays plain causal.
    hidden = model.language_model.hidden_states(embeds, remat=remat)
    labels, mask = batch["ids"][:, 1:], batch["is_target"][:, 1:].astype(jnp.float32)
    total = model.language_model.chunked_cross_entropy(hidden[:, :-1], labels, mask, chunk)
    return total, mask.sum()


def make_functions(graph, tx, config):
    """-> jitted (train_step, loss_and_grad); loss_and_grad gives one batch's (summed loss,
    supervised tokens) and gradients, without accumulation or an update (tests, planning)."""
    accumulation, remat, chunk = config.grad_accum_steps, config.remat, config.loss_chunk

    def micro_loss(params, frozen, rest, batch):
        return loss_sums(nnx.merge(graph, params, frozen, rest), batch, remat=remat, chunk=chunk)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(params, opt_state, frozen, rest, batch):
        (total, count), grads = optimization.accumulate_gradients(grad_fn, params, (frozen, rest), batch, accumulation)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)  # the token mean over the whole global batch
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": total / count, "grad_norm": optax.tree.norm(grads),
                                   "target_tokens": count}

    return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(grad_fn)


# ---------------------------------------------------------------------------- the stage


@dataclasses.dataclass(frozen=True)
class Data:
    annotations: object  # file(s) of training rows
    data_dir: str  # their preprocessed videos
    eval_file: str | None  # held-out demo questions (the built-in demo only)


def stage_data(config, workdir: str) -> Data:
    """config.annotations over config.data_dir, or the built-in demo data."""
    if config.annotations:
        return Data(config.annotations, os.path.expanduser(config.data_dir), None)
    train_file, eval_file, data_dir = demo.stage2_data(config, workdir)
    return Data(train_file, data_dir, eval_file)


class Stage:
    """Everything stage 2 builds from a config; `loop.train` runs it."""

    def __init__(self, config, workdir: str, data: Data | None = None):
        check_config(config)
        self.workdir = workdir
        self.mesh = sharding.build_mesh(config)
        config = self.config = optimization.with_accumulation(config, self.mesh)
        self.rules = sharding.logical_rules(config)
        data = data or stage_data(config, workdir)
        self.data_dir, self.eval_file = data.data_dir, data.eval_file
        model, self.tokenizer, self.delta_info = build_model(config, workdir, self.mesh, self.rules,
                                                             jnp.dtype(config.compute_dtype))
        set_remat(model, config.remat)  # the tower and the Δ-encoder; the LLM's is a loss_sums argument
        set_attention(model, config.attention)
        set_scan_layers(model, config.scan_layers)
        self.settings = self._video_settings(model)
        rows = instruct.read_annotations(data.annotations, seed=config.seed)
        self.source = instruct.InstructSource(rows, self.data_dir, self.tokenizer, self.settings,
                                              tokens_per_keyframe=model.config.tokens_per_keyframe,
                                              tokens_per_p_step=model.config.tokens_per_p_step,
                                              max_seq_len=config.max_seq_len, size=self.settings.preprocessing.size)
        self.source.write_skipped(workdir)
        self.graph, self.params, self.frozen, self.rest = optimization.split_trainable(model, config)
        self.parameters = parameter_count(model)
        self.tx, self.schedule, self.learning_rates = optimization.make_optimizer(config, self.params)
        self.train_step, self.loss_and_grad = make_functions(self.graph, self.tx, config)
        self.loader = instruct.loader(self.source, global_batch_size=config.batch_size, seed=config.seed,
                                      workers=config.data_workers, process_index=jax.process_index(),
                                      process_count=jax.process_count())

    def _video_settings(self, model) -> VideoSettings:
        """How the data's videos are read: its preprocessing, the config's switches."""
        preprocessing = codec.Settings.from_dict(records.read_manifest(self.data_dir)["settings"])
        if preprocessing.size != model.config.vision.image_size:
            raise ConfigError(f"{self.data_dir}: frames are {preprocessing.size} px, the vision tower takes "
                              f"{model.config.vision.image_size} px (preprocess with --size {model.config.vision.image_size})")
        return VideoSettings(preprocessing=preprocessing).with_switches(
            where="config.keyframes_per_gop / max_gops / time_instruction", error=ConfigError,
            keyframes_per_gop=self.config.keyframes_per_gop, max_gops=self.config.max_gops,
            time_instruction=self.config.time_instruction)

    def describe(self) -> str:
        trainable = sum(x.size for x in jax.tree.leaves(self.params))
        groups = ", ".join(f"{name.split(':', 1)[-1]} {rate:g}" for name, rate in self.learning_rates.items())
        lengths = [e.tokens for e in self.source.examples]
        return (f"CoPE-VideoLM: {self.parameters / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
                f"(learning rates: {groups}); mesh {dict(self.mesh.shape)}; {len(self.source)} training samples from "
                f"{self.data_dir}, {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}); "
                f"{self.config.keyframes_per_gop} keyframes per GOP, up to {self.source.keyframe_slots} keyframes and "
                f"{self.source.p_step_slots} P steps per sample")

    def device_batch(self, local: dict) -> dict:
        length = instruct.bucket_length(_agreed_max(local["length"]), self.config.length_buckets)
        batch = {k: local[k][:, :length] for k in ("ids", "is_visual", "is_target")}
        batch |= {k: local[k] for k in ("keyframes", "mv", "residual", "token_source")}
        return sharding.global_batch(batch, self.mesh, self.rules)

    def step(self, params, opt_state, local: dict):
        return self.train_step(params, opt_state, self.frozen, self.rest, self.device_batch(local))

    def data_order(self, local: dict) -> list:
        return np.asarray(local["example"]).tolist()

    def format_metrics(self, values: dict) -> str:
        return f"loss {values['loss']:.5f} ({values['target_tokens']:.0f} supervised tokens)"

    def model(self, params=None) -> CoPEVideoLM:
        return nnx.merge(self.graph, self.params if params is None else params, self.frozen, self.rest)

    def finish(self, params, step: int) -> None:
        """<workdir>/model/: a CoPE checkpoint (docs/architecture.md §7) for chat and evaluation."""
        path = checkpoints.export(os.path.join(self.workdir, MODEL_DIR), self.model(params), self.tokenizer,
                                  self.settings, self.delta_info,
                                  source=f"stage 2 fine-tuning ({self.workdir}, step {step})", step=step)
        log(f"exported the fine-tuned CoPE checkpoint to {path} (python -m cope_jax.chat --checkpoint {path} --video ...)")


def _agreed_max(lengths: np.ndarray) -> int:
    """The longest sequence of the global batch: every process pads to the same bucket."""
    longest = int(np.max(lengths))
    if jax.process_count() > 1:
        longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    return longest


# ---------------------------------------------------------------------------- running it


def run_stage1(config, workdir: str, data_dir: str, evaluators: dict | None = None) -> str:
    """Stage 1 (config.pretrain) in <workdir>/pretrain on `data_dir`, skipped when done -> its workdir."""
    stage1_dir = os.path.join(workdir, STAGE1_DIR)
    stage1 = config.pretrain.copy_and_resolve_references()
    with stage1.unlocked():
        stage1.data_dir = data_dir
        stage1.seed = config.seed
    ckpt = checkpoints.Checkpoints.of(stage1, stage1_dir)
    done = ckpt.latest_step() == stage1.total_steps
    ckpt.close()
    if done:
        log(f"stage 1: finished earlier in {stage1_dir}")
    else:
        log(f"stage 1: Δ-encoder alignment in {stage1_dir} ({stage1.total_steps} steps)")
        pretrain.train(stage1, stage1_dir, evaluators)
    return stage1_dir


def train(config, workdir: str, evaluators: dict | None = None, stage1_evaluators: dict | None = None) -> dict:
    """Stage 1 first when config.run_pretrain, then stage 2. `evaluators`: {name: evaluator}
    (`cope_jax.evaluation.for_config`); none given, none run."""
    check_config(config)
    # The mesh and batch checks too, before the demo data or stage 1 write anything.
    optimization.with_accumulation(config, sharding.build_mesh(config))
    data = stage_data(config, workdir)
    if config.run_pretrain:
        run_stage1(config, workdir, data.data_dir, stage1_evaluators)
    return loop.train(Stage(config, workdir, data), evaluators)


def evaluate_only(config, workdir: str, evaluators: dict) -> dict:
    loop.require_checkpoint(config, workdir)
    return loop.evaluate_latest(Stage(config, workdir), evaluators)
