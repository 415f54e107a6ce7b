"""Stage 2: end-to-end instruction tuning of CoPE-VideoLM (paper §3.3 "Integration into VideoLMs",
App. C; docs/architecture.md §8).

The whole VideoLM reads the interleaved keyframe + Δ-token stream of each video and learns by
next-token loss on the assistant's tokens only. This module supplies the stage to the shared loop
(`training.loop`): the model (a converted LLaVA-Video / CoPE checkpoint, or a random tiny one),
the trainable split with per-regex learning rates, the data (`training.instruct`), the loss, and at
the end a CoPE checkpoint in <workdir>/model/ plus, on the demo data, held-out accuracy with
Δ-tokens, zeroed Δ-tokens and keyframes only (paper App. H.3, H.4).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cope_jax import checkpoints, distributed, sharding
from cope_jax.errors import ConfigError
from cope_jax.inference.stream import VideoSettings
from cope_jax.models.cope.modeling import CoPEConfig, CoPEVideoLM
from cope_jax.models.delta_encoder.modeling import parameter_count
from cope_jax.models.attention import IMPLEMENTATIONS, set_attention
from cope_jax.models.common import REMAT_POLICIES, set_remat, set_scan_layers
from cope_jax.training import core, instruct, loop, pretrain
from cope_jax.training.loop import log

MODEL_DIR = "model"
SKIPPED_FILE = "skipped.jsonl"
DEMO_ANSWERS = "ABCD"


# ---------------------------------------------------------------------------- config


def check_config(config) -> None:
    """Every problem of the config at once, in one line (nothing is written before this passes)."""
    problems = []
    for field in ("total_steps", "batch_size", "checkpoint_every_steps", "log_every_steps", "keep_checkpoints",
                  "max_seq_len", "learning_rate", "loss_chunk", "keyframes_per_gop", "max_gops"):
        value = config[field]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            problems.append(f"config.{field} must be > 0, got {value!r}")
    if not isinstance(config.grad_accum_steps, int) or config.grad_accum_steps < 0:
        problems.append(f"config.grad_accum_steps must be >= 0 (0: one row per device at a time), got {config.grad_accum_steps!r}")
    if isinstance(config.batch_size, int) and isinstance(config.grad_accum_steps, int) and config.grad_accum_steps > 0 \
            and config.batch_size % config.grad_accum_steps:
        problems.append(f"config.batch_size {config.batch_size} is not divisible by config.grad_accum_steps "
                        f"{config.grad_accum_steps}")
    if not 0 <= config.warmup_ratio < 1:
        problems.append(f"config.warmup_ratio must be in [0, 1), got {config.warmup_ratio!r}")
    if config.eval_every_steps < 0:
        problems.append(f"config.eval_every_steps must be >= 0, got {config.eval_every_steps!r}")
    if config.compute_dtype not in ("float32", "bfloat16"):
        problems.append(f"config.compute_dtype must be float32 or bfloat16, got {config.compute_dtype!r}")
    if config.attention not in IMPLEMENTATIONS:
        problems.append(f"config.attention must be one of {', '.join(IMPLEMENTATIONS)}, got {config.attention!r}")
    if config.remat not in REMAT_POLICIES:
        problems.append(f"config.remat must be one of {', '.join(REMAT_POLICIES)}, got {config.remat!r}")
    buckets = list(config.length_buckets)
    if not buckets or any(not isinstance(b, int) or b <= 0 for b in buckets):
        problems.append(f"config.length_buckets must be positive token counts, got {buckets!r}")
    elif max(buckets) < config.max_seq_len:
        problems.append(f"config.length_buckets {buckets}: the largest must be >= config.max_seq_len {config.max_seq_len}")
    for field in ("trainable", "frozen"):
        for pattern in config[field]:
            problems += _regex_problem(f"config.{field}", pattern)
    for entry in config.learning_rates:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], (int, float)) and entry[1] > 0):
            problems.append(f"config.learning_rates entries must be (regex, rate > 0), got {entry!r}")
        else:
            problems += _regex_problem("config.learning_rates", entry[0])
    for mode in config.eval_delta_modes:
        if mode not in ("cope", "zero", "keyframes_only"):
            problems.append(f"config.eval_delta_modes: unknown mode {mode!r} (cope, zero, keyframes_only)")
    for field in ("init_checkpoint", "delta_checkpoint", "data_dir"):
        if config[field] and not os.path.isdir(os.path.expanduser(config[field])):
            problems.append(f"config.{field} {config[field]}: no such directory")
    if bool(config.annotations) != bool(config.data_dir):
        problems.append("config.annotations and config.data_dir go together (both empty: the built-in demo data)")
    if config.run_pretrain and config.delta_checkpoint:
        problems.append("config.run_pretrain and config.delta_checkpoint exclude each other (one source of the Δ-encoder)")
    if problems:
        raise ConfigError("; ".join(problems))


def with_accumulation(config, mesh):
    """The config with config.grad_accum_steps resolved for `mesh`: 0 means one row per data x fsdp
    device at a time (global batch / those devices micro-batches); checks that micro-batches split evenly."""
    shards = core.batch_shards(mesh)
    if config.grad_accum_steps == 0:
        if config.batch_size % shards:
            raise ConfigError(f"config.batch_size {config.batch_size} is not divisible by the data x fsdp devices ({shards})")
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.grad_accum_steps = config.batch_size // shards
    core.check_accumulation(config, mesh)
    return config


def _regex_problem(field: str, pattern) -> list[str]:
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        return [f"{field}: bad regex {pattern!r} ({e})"]
    return []


def path_name(path) -> str:
    return "/".join(str(p) for p in path)


# ---------------------------------------------------------------------------- model


def build_model(config, workdir: str, mesh, rules, compute):
    """-> (model on the mesh, tokenizer, {"source", ...} of its Δ-encoder or None)."""
    delta_path = os.path.join(workdir, "pretrain") if config.run_pretrain else config.delta_checkpoint
    if config.init_checkpoint:
        model, tokenizer = _from_checkpoint(config.init_checkpoint, mesh, rules, compute)
    else:
        model, tokenizer = _random_model(config, delta_path, mesh, rules, compute)
    delta_info = None
    if delta_path:
        encoder, delta_info = pretrain.load_delta_encoder(delta_path)
        if encoder.config != model.config.delta:
            raise ConfigError(f"{delta_path}: its Δ-encoder {encoder.config} does not match the model's "
                              f"{model.config.delta}")
        nnx.update(model.delta_encoder, nnx.state(encoder))
        reshard(model, mesh, rules)
    elif not (config.init_checkpoint and not checkpoints.read_meta(config.init_checkpoint).get("delta_encoder", {}).get("random", True)):
        log("NOTE: no trained Δ-encoder (config.delta_checkpoint is empty): it starts RANDOM, the one-stage setting "
            "of paper App. H.2, which trains worse than starting from stage 1")
    return model, tokenizer, delta_info


def _from_checkpoint(path: str, mesh, rules, compute):
    from cope_jax.inference import load_tokenizer

    meta = checkpoints.read_meta(os.path.expanduser(path))
    if meta["kind"] != "cope":
        raise ConfigError(f"config.init_checkpoint {path}: holds a {meta['kind']} model, not LLaVA-Video / CoPE "
                          "(convert LLaVA-Video-7B-Qwen2 with python -m cope_jax.convert)")
    model = checkpoints.load(os.path.expanduser(path), mesh=mesh, rules=rules, dtype=compute, param_dtype="float32")
    return model, load_tokenizer(os.path.expanduser(path))


def _random_model(config, delta_path: str, mesh, rules, compute):
    """A random CoPE-VideoLM from config.model; with a stage-1 workdir whose tower was random,
    that same tower (rebuilt from its config and seed), so Δ-tokens live in its feature space."""
    from cope_jax.tokenizer import chatml_tokenizer

    try:
        model_config = CoPEConfig.from_dict(config.model.to_dict())
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config.model: {e}") from None
    tower = None
    if delta_path:
        stage1 = pretrain.read_config(delta_path)
        tower = pretrain.build_siglip(stage1, compute, quiet=True)
        model_config = dataclasses.replace(model_config, vision=tower.config, delta=pretrain.delta_config(stage1))
    tokenizer = chatml_tokenizer(model_config.text.vocab_size)
    if len(tokenizer) > model_config.text.vocab_size:
        raise ConfigError(f"config.model.text.vocab_size {model_config.text.vocab_size} < the tokenizer's {len(tokenizer)}")
    log("NOTE: config.init_checkpoint is empty: a RANDOM tiny CoPE-VideoLM with a locally built tokenizer (demo only)")
    model = sharding.create_sharded(lambda: CoPEVideoLM(model_config, dtype=compute, param_dtype="float32",
                                                        rngs=nnx.Rngs(config.seed)), mesh, rules)
    if tower is not None:
        nnx.update(model.vision_tower, nnx.state(tower))
        reshard(model, mesh, rules)
    return model, tokenizer


def reshard(module: nnx.Module, mesh, rules) -> None:
    """Every array of `module` onto its shard (after parts were replaced from single-device loads)."""
    state = nnx.state(module)
    nnx.update(module, sharding.put(state, sharding.state_shardings(state, mesh, rules)))


# ---------------------------------------------------------------------------- optimisation


def split_trainable(model: nnx.Module, config):
    """-> graphdef, trainable params, frozen params, everything else (BatchNorm statistics)."""
    trainable = [re.compile(p) for p in config.trainable]
    frozen = [re.compile(p) for p in config.frozen]

    def is_trainable(path, value) -> bool:
        name = path_name(path)
        return (isinstance(value, nnx.Param) and any(p.search(name) for p in trainable)
                and not any(p.search(name) for p in frozen))

    graph, train, fixed, rest = nnx.split(model, is_trainable, nnx.Param, ...)
    if not jax.tree.leaves(train):
        raise ConfigError(f"config.trainable {list(config.trainable)} minus config.frozen {list(config.frozen)} "
                          "selects no parameters")
    return graph, train, fixed, rest


def learning_rate_groups(params, config) -> tuple[dict, object]:
    """{group: peak rate} and the label tree for optax.multi_transform: the first
    config.learning_rates regex matching a parameter's path names its group, else "default"."""
    patterns = [(re.compile(p), float(rate)) for p, rate in config.learning_rates]
    groups = {"default": float(config.learning_rate)}

    def label(path, _):
        name = "/".join(core.path_key(path))
        for i, (pattern, rate) in enumerate(patterns):
            if pattern.search(name):
                groups[f"group{i}:{pattern.pattern}"] = rate
                return f"group{i}:{pattern.pattern}"
        return "default"

    labels = jax.tree_util.tree_map_with_path(label, params)
    return groups, labels


def make_optimizer(config, params):
    """AdamW per learning-rate group (linear warmup over warmup_ratio of the steps, then cosine;
    LLaVA-Video's recipe), after one global-norm clip. Only `params` (the trainable ones) get
    optimizer state."""
    warmup = int(round(config.warmup_ratio * config.total_steps))
    groups, labels = learning_rate_groups(params, config)
    schedules = {name: optax.warmup_cosine_decay_schedule(0.0, rate, warmup, config.total_steps)
                 for name, rate in groups.items()}
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731 - no decay on biases and norms
    transforms = {name: optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                                    weight_decay=config.weight_decay, mask=decay_mask)
                  for name, schedule in schedules.items()}
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optax.multi_transform(transforms, labels))
    return tx, schedules["default"], groups


# ---------------------------------------------------------------------------- loss


def chunked_cross_entropy(language_model, hidden: jax.Array, labels: jax.Array, mask: jax.Array, chunk: int):
    """Sum of next-token cross-entropy over `mask`, computed `chunk` positions at a time and
    recomputed in the backward pass, so [B,T,V] logits never exist (at 7B, 16k x 152k floats
    is 10 GB per sequence)."""
    b, t, d = hidden.shape

    @jax.checkpoint
    def chunk_loss(h, y, m):
        logits = language_model.logits(h)  # float32 [B,c,V]
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.sum((log_z - picked) * m)

    if t <= chunk:
        return chunk_loss(hidden, labels, mask)
    n = -(-t // chunk)
    pad = n * chunk - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels, mask = jnp.pad(labels, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
    chunks = (hidden.reshape(b, n, chunk, d).swapaxes(0, 1), labels.reshape(b, n, chunk).swapaxes(0, 1),
              mask.reshape(b, n, chunk).swapaxes(0, 1))
    total, _ = jax.lax.scan(lambda acc, x: (acc + chunk_loss(*x), None), jnp.zeros((), jnp.float32), chunks)
    return total


def loss_sums(model: CoPEVideoLM, batch: dict, *, remat: str, chunk: int, zero_delta: bool = False):
    """(summed cross-entropy over supervised tokens, their count) for one micro-batch."""
    visual = model.encode_videos(batch["keyframes"], batch["mv"], batch["residual"], batch["token_source"], zero_delta)
    embeds = model.merge_visual(batch["ids"], batch["is_visual"], visual)
    # Right padding: causality alone keeps it from real tokens, so the attention stays plain causal.
    hidden = model.language_model.hidden_states(embeds, remat=remat)
    labels, mask = batch["ids"][:, 1:], batch["is_target"][:, 1:].astype(jnp.float32)
    total = chunked_cross_entropy(model.language_model, hidden[:, :-1], labels, mask, chunk)
    return total, mask.sum()


def make_functions(graph, tx, config):
    """-> jitted (train_step, loss_and_grad); loss_and_grad gives one batch's (summed loss,
    supervised tokens) and gradients, without accumulation or an update (tests, planning)."""
    accumulation, remat, chunk = config.grad_accum_steps, config.remat, config.loss_chunk

    def micro_loss(params, frozen, rest, batch):
        return loss_sums(nnx.merge(graph, params, frozen, rest), batch, remat=remat, chunk=chunk)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(params, opt_state, frozen, rest, batch):
        (total, count), grads = core.accumulate_gradients(grad_fn, params, (frozen, rest), batch, accumulation)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)  # the token mean over the whole global batch
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": total / count, "grad_norm": optax.tree.norm(grads),
                                   "target_tokens": count}

    return jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(grad_fn)


# ---------------------------------------------------------------------------- data


def prepare_demo_data(config, workdir: str) -> tuple[list[str], str]:
    """Demo clips whose questions need motion (which way the camera pans; which corner a square
    heads to), preprocessed at the tower's size: (annotation files [train, held-out], data_dir)."""
    from data_pipeline import preprocess, synthetic

    data_dir = os.path.join(workdir, "demo_data")
    train_file, eval_file = os.path.join(data_dir, "train.json"), os.path.join(data_dir, "eval.json")
    size = config.pretrain.model.image_size if config.run_pretrain else config.model.vision.image_size
    if jax.process_index() == 0 and not os.path.exists(eval_file):
        videos = os.path.join(workdir, "demo_videos")
        total = config.demo_clips + config.demo_eval_clips
        log(f"config.data_dir is empty: writing {total} demo clips ({size}x{size}, questions that need motion) "
            "and preprocessing them")
        rows = synthetic.motion_questions(videos, total, size=size, seed=config.seed)
        code = preprocess.main(["--videos", videos, "--output", data_dir, "--size", str(size), "--gop", "120",
                                "--fusion", "10", "--num-shards", "2", "--workers", "1", "--quiet"])
        if code:
            raise RuntimeError("preprocessing the demo clips failed")
        for path, part in ((train_file, rows[:config.demo_clips]), (eval_file, rows[config.demo_clips:])):
            with open(path + ".tmp", "w") as f:
                json.dump(part, f, indent=1)
            os.replace(path + ".tmp", path)
    core.wait_for_process_0("demo data")
    return [train_file, eval_file], data_dir


def run_stage1(config, workdir: str, data_dir: str) -> None:
    """The tiny pipeline's stage 1 in <workdir>/pretrain on the same clips (skipped when done)."""
    stage1_dir = os.path.join(workdir, "pretrain")
    stage1 = config.pretrain.copy_and_resolve_references()
    with stage1.unlocked():
        stage1.data_dir = data_dir
        stage1.seed = config.seed
    ckpt = loop.open_checkpoints(stage1, stage1_dir)
    done = ckpt.latest_step() == stage1.total_steps
    ckpt.close()
    if done:
        log(f"stage 1: finished earlier in {stage1_dir}")
        return
    log(f"stage 1: Δ-encoder alignment in {stage1_dir} ({stage1.total_steps} steps)")
    pretrain.train(stage1, stage1_dir)


# ---------------------------------------------------------------------------- the stage


class Stage:
    """Everything stage 2 builds from a config; `loop.train` runs it."""

    def __init__(self, config, workdir: str):
        check_config(config)
        self.config, self.workdir = config, workdir
        self.mesh = core.build_mesh(config)
        config = self.config = with_accumulation(config, self.mesh)
        rules = core.logical_rules(config)
        compute = jnp.dtype(config.compute_dtype)
        if config.annotations:
            annotation_files, self.data_dir = config.annotations, os.path.expanduser(config.data_dir)
            self.eval_file = None
        else:
            annotation_files, self.data_dir = prepare_demo_data(config, workdir)
            annotation_files, self.eval_file = annotation_files[0], annotation_files[1]
        if config.run_pretrain:
            run_stage1(config, workdir, self.data_dir)
        model, self.tokenizer, self.delta_info = build_model(config, workdir, self.mesh, rules, compute)
        set_remat(model, config.remat)  # the tower and the Δ-encoder; the LLM's is a loss_sums argument
        set_attention(model, config.attention)
        set_scan_layers(model, config.scan_layers)
        self.model_config = model.config
        preprocessing = instruct.data_settings(self.data_dir)
        if preprocessing["size"] != model.config.vision.image_size:
            raise ConfigError(f"{self.data_dir}: frames are {preprocessing['size']} px, the vision tower takes "
                              f"{model.config.vision.image_size} px (preprocess with --size {model.config.vision.image_size})")
        self.settings = VideoSettings(
            preprocessing=instruct.preprocessing_settings(self.data_dir),
            keyframes_per_gop=config.keyframes_per_gop, max_gops=config.max_gops, time_instruction=config.time_instruction)
        try:
            self.settings.check()
        except ValueError as e:
            raise ConfigError(f"config.keyframes_per_gop / max_gops: {e}") from None
        rows = instruct.read_annotations(annotation_files, seed=config.seed)
        self.source = instruct.InstructSource(rows, self.data_dir, self.tokenizer, self.settings,
                                              tokens_per_keyframe=model.config.tokens_per_keyframe,
                                              tokens_per_p_step=model.config.tokens_per_p_step,
                                              max_seq_len=config.max_seq_len, size=preprocessing["size"])
        self._write_skipped(rows)
        self.graph, self.params, self.frozen, self.rest = split_trainable(model, config)
        self.parameters = parameter_count(model)
        self.trainable_parameters = sum(x.size for x in jax.tree.leaves(self.params))
        self.tx, self.schedule, self.learning_rates = make_optimizer(config, self.params)
        self.train_step, self.loss_and_grad = make_functions(self.graph, self.tx, config)
        self.loader = instruct.loader(self.source, global_batch_size=config.batch_size, seed=config.seed,
                                      workers=config.data_workers, process_index=jax.process_index(),
                                      process_count=jax.process_count())

    def _write_skipped(self, rows) -> None:
        skipped = self.source.skipped
        if jax.process_index() == 0:
            os.makedirs(self.workdir, exist_ok=True)
            with open(os.path.join(self.workdir, SKIPPED_FILE), "w") as f:
                for entry in skipped:
                    f.write(json.dumps(entry) + "\n")
        if skipped:
            reasons = {}
            for entry in skipped:
                reasons[entry["reason"].split(":")[0]] = reasons.get(entry["reason"].split(":")[0], 0) + 1
            log(f"skipped {len(skipped)} of {len(rows)} rows (listed in {os.path.join(self.workdir, SKIPPED_FILE)}): "
                + "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3]))

    def describe(self) -> str:
        groups = ", ".join(f"{name.split(':', 1)[-1]} {rate:g}" for name, rate in self.learning_rates.items())
        lengths = [e.tokens for e in self.source.examples]
        return (f"CoPE-VideoLM: {self.parameters / 1e6:.2f}M parameters, {self.trainable_parameters / 1e6:.2f}M trainable "
                f"(learning rates: {groups}); mesh {dict(self.mesh.shape)}; {len(self.source)} training samples from "
                f"{self.data_dir}, {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}); "
                f"{self.config.keyframes_per_gop} keyframes per GOP, up to {self.source.keyframe_slots} keyframes and "
                f"{self.source.p_step_slots} P steps per sample")

    def device_batch(self, local: dict) -> dict:
        length = instruct.bucket_length(_agreed_max(local["length"]), self.config.length_buckets)
        batch = {k: local[k][:, :length] for k in ("ids", "is_visual", "is_target")}
        batch |= {k: local[k] for k in ("keyframes", "mv", "residual", "token_source")}
        return core.global_batch(batch, self.mesh)

    def step(self, params, opt_state, local: dict):
        return self.train_step(params, opt_state, self.frozen, self.rest, self.device_batch(local))

    def data_order(self, local: dict) -> list:
        return np.asarray(local["example"]).tolist()

    def format_metrics(self, values: dict) -> str:
        return f"loss {values['loss']:.5f} ({values['target_tokens']:.0f} supervised tokens)"

    def model(self, params=None) -> CoPEVideoLM:
        return nnx.merge(self.graph, self.params if params is None else params, self.frozen, self.rest)

    def evaluate(self, params) -> dict:
        if not self.eval_file:
            return {}
        return demo_accuracy(self.model(params), self.tokenizer, self.settings, self.eval_file, self.data_dir,
                             self.config.eval_delta_modes, self.config.eval_max_questions)

    def finish(self, params, step: int) -> dict:
        path = export(self.model(params), self.tokenizer, self.settings, self.delta_info, self.workdir, step)
        log(f"exported the fine-tuned CoPE checkpoint to {path} (python -m cope_jax.chat --checkpoint {path} --video ...)")
        result = self.evaluate(params)
        if result and jax.process_index() == 0:
            with open(os.path.join(self.workdir, "demo_accuracy.json"), "w") as f:
                json.dump(result, f, indent=1)
        return result


def _agreed_max(lengths: np.ndarray) -> int:
    """The longest sequence of the global batch: every process pads to the same bucket."""
    longest = int(np.max(lengths))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    return longest


def export(model: CoPEVideoLM, tokenizer, settings: VideoSettings, delta_info: dict | None, workdir: str,
           step: int) -> str:
    """<workdir>/model/: a CoPE checkpoint (docs/architecture.md §7) with the tokenizer, for chat and evaluation."""
    from cope_jax.convert import cope_checkpoint_info

    path = os.path.join(workdir, MODEL_DIR)
    partial = f"{path}.partial"
    if jax.process_index() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        tokenizer.save_pretrained(partial)
    core.wait_for_process_0("export directory")
    # Trained here either way; without stage 1 it started random (paper H.2), which the source says.
    info = cope_checkpoint_info(model, delta_info or {"source": "random initialisation, trained in stage 2"}, settings)
    checkpoints.save(partial, model, source=f"stage 2 fine-tuning ({workdir}, step {step})", step=step, **info)
    if jax.process_index() == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(partial, path)
    core.wait_for_process_0("exported model")
    return path


# ---------------------------------------------------------------------------- demo accuracy


def demo_accuracy(model: CoPEVideoLM, tokenizer, settings: VideoSettings, eval_file: str, data_dir: str,
                  modes, max_questions: int = 0) -> dict:
    """Held-out multiple-choice accuracy per delta mode, through the inference path users run."""
    from cope_jax import evaluate
    from cope_jax.inference import VideoChat, video_from_records
    from cope_jax.inference.generation import SamplingConfig

    rows = instruct.read_annotations(eval_file)[: max_questions or None]
    result, lines = {}, []
    for mode in modes:
        mode_settings = dataclasses.replace(settings, delta_mode=mode)
        correct = tokens = 0
        for row in rows:
            video = video_from_records(data_dir, instruct.video_key(row))
            chat = VideoChat(model, tokenizer, mode_settings, video=lambda v=video: v,
                             sampling=SamplingConfig(max_new_tokens=3))
            question = instruct.conversation_turns(row)[0][1]
            answer = "".join(chat.ask(question))
            distributed.progress(f"held-out question {row.get('id', '')} ({mode})")
            correct += evaluate.answer_letter(answer, DEMO_ANSWERS) == row["conversations"][1]["value"].strip()[:1]
            tokens = chat.last.visual_tokens
        result[f"accuracy_{mode}"] = correct / max(len(rows), 1)
        result[f"visual_tokens_{mode}"] = tokens
        lines.append(f"| {mode:<15} | {tokens:>13} | {correct:>3}/{len(rows):<3} = {correct / max(len(rows), 1):6.1%} |")
    log(f"held-out accuracy, {len(rows)} questions ({settings.keyframes_per_gop} keyframe(s) per GOP; chance 25%):\n"
        "| delta mode      | visual tokens | accuracy         |\n|-----------------|---------------|------------------|\n"
        + "\n".join(lines))
    return result


def train(config, workdir: str) -> dict:
    return loop.train(Stage(config, workdir))


def evaluate_only(config, workdir: str) -> dict:
    loop.require_checkpoint(config, workdir)
    stage = Stage(config, workdir)
    loop.restore_latest(stage)
    return stage.evaluate(stage.params)
