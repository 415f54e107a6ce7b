"""Stage 1: align the Δ-encoder with SigLIP (paper §3.3, Eq. 7-10; App. C).

Each example is a P step: SigLIP tokens of rgb[t-1] (frozen tower) + the Δ of step t go through
the Δ-encoder and the reference and warped transformers; the loss is the patch-wise MSE against
the frozen SigLIP tokens of rgb[t]. The workdir keeps its config (`checkpoints.save_stage1_config`)
so that stage 2 and `cope_jax.convert` can take the trained Δ-encoder from it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cope_jax import checkpoints, sharding
from cope_jax.errors import ConfigError
from cope_jax.models.attention import set_attention
from cope_jax.models.common import set_remat, set_scan_layers
from cope_jax.models.cope.modeling import normalize_frames
from cope_jax.models.delta_encoder.modeling import DeltaPretrainer, parameter_count
from cope_jax.models.siglip.modeling import SiglipVisionConfig, SiglipVisionModel
from cope_jax.training import checks, demo, loop, optimization
from cope_jax.training.loop import log
from data_pipeline import loaders

# Stage 1 trains the Δ-pretrainer; the SigLIP tower it is aligned with stays frozen (paper §3.3).
FROZEN = ("^target_tower/",)


def build_siglip(config, dtype, quiet: bool = False, mesh=None) -> SiglipVisionModel:
    """The frozen tower: from a converted checkpoint, or a small random one (tiny runs only; the
    same config and seed rebuild the same tower, which is how stage 2 finds it again)."""
    if not config.siglip_checkpoint:
        try:
            siglip_config = SiglipVisionConfig(**dict(config.siglip))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.siglip: {e}") from None
        if not quiet:
            log("NOTE: config.siglip_checkpoint is empty: using a small RANDOM SigLIP tower as the target. "
                "Fine for the tiny demo; real pretraining needs a converted SigLIP / LLaVA-Video checkpoint.")
        return SiglipVisionModel(siglip_config, dtype=dtype, rngs=nnx.Rngs(config.seed + 1))
    if not os.path.isdir(config.siglip_checkpoint):
        raise ConfigError(f"config.siglip_checkpoint {config.siglip_checkpoint}: no such directory")
    # On the mesh (replicated or sharded by the rules): a tower on one local device cannot meet the
    # mesh-sharded Δ-encoder in one jitted step, and in a multi-process run would be another per host.
    module = checkpoints.load(config.siglip_checkpoint, mesh=mesh, rules=sharding.logical_rules(config))
    tower = getattr(module, "vision_tower", module)
    if not isinstance(tower, SiglipVisionModel):
        raise ConfigError(f"config.siglip_checkpoint {config.siglip_checkpoint}: holds a {type(module).__name__}, "
                          "not SigLIP or a LLaVA-Video/CoPE model")
    return tower


def make_functions(graph, tx, mesh, accumulation: int = 1):
    """Jitted train step (over `accumulation` equal micro-batches), SigLIP tokens and predictions
    of the stage-1 model (the Δ-pretrainer with the frozen tower as `target_tower`); the graphdef is
    static (closed over)."""

    def loss_fn(params, frozen, rest, batch):
        model = nnx.merge(graph, params, frozen, rest)
        prev_tokens = jax.lax.stop_gradient(model.target_tower(normalize_frames(batch["prev_rgb"])))
        target = jax.lax.stop_gradient(model.target_tower(normalize_frames(batch["rgb"]))).astype(jnp.float32)
        predicted = model(prev_tokens, batch["mv"], batch["residual"]).astype(jnp.float32)
        # What copying frame t-1's tokens would score: the bar the Δ path has to beat.
        copy_loss = jnp.mean((prev_tokens.astype(jnp.float32) - target) ** 2)
        return jnp.mean((predicted - target) ** 2), copy_loss

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(params, opt_state, frozen, rest, batch):
        # Equal micro-batches: the mean of their means is the batch's mean.
        (loss, copy_loss), grads = jax.tree.map(
            lambda total: total / accumulation,
            optimization.accumulate_gradients(grad_fn, params, (frozen, rest), batch, accumulation))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params, opt_state, {"loss": loss, "copy_loss": copy_loss, "grad_norm": optax.tree.norm(grads)}

    def siglip_tokens(params, frozen, rest, rgb):
        return nnx.merge(graph, params, frozen, rest).target_tower(normalize_frames(rgb)).astype(jnp.float32)

    def predict(params, frozen, rest, prev_tokens, mv, residual):
        return nnx.merge(graph, params, frozen, rest)(prev_tokens, mv, residual).astype(jnp.float32)

    # Evaluation reads these on the host: replicated, so every process holds the whole result
    # even when the parameters are sharded across hosts.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return (jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(siglip_tokens, out_shardings=replicated),
            jax.jit(predict, out_shardings=replicated),
            jax.jit(grad_fn))


def with_target_tower(model: DeltaPretrainer, tower) -> DeltaPretrainer:
    """The stage-1 model: the Δ-pretrainer holding the tower whose tokens it learns to predict,
    frozen by `FROZEN` through the same regex split stage 2 freezes with."""
    model.target_tower = tower
    return model


def check_config(config) -> None:
    problems = checks.problems(config)
    if not isinstance(config.grad_accum_steps, int) or isinstance(config.grad_accum_steps, bool) or config.grad_accum_steps < 1:
        problems.append(f"config.grad_accum_steps must be an integer >= 1, got {config.grad_accum_steps!r}")
    checks.check(problems)


class Stage:
    """Everything built from a config: mesh, models, data, optimizer, checkpoints."""

    def __init__(self, config, workdir: str):
        check_config(config)
        self.config, self.workdir = config, workdir
        self.mesh = sharding.build_mesh(config)
        optimization.with_accumulation(config, self.mesh)
        self.rules = rules = sharding.logical_rules(config)
        compute = jnp.dtype(config.compute_dtype)
        model_config = checkpoints.stage1_delta_config(config)
        self.siglip = build_siglip(config, compute, mesh=self.mesh)
        if self.siglip.config.image_size != model_config.image_size or self.siglip.config.hidden_size != model_config.width:
            raise ConfigError(f"SigLIP ({self.siglip.config.image_size} px, width {self.siglip.config.hidden_size}) and "
                              f"config.model ({model_config.image_size} px, width {model_config.width}) must agree")
        if config.data_dir and not os.path.isdir(config.data_dir):
            raise ConfigError(f"config.data_dir {config.data_dir}: no such directory")
        self.data_dir = config.data_dir or demo.stage1_data(config, workdir)
        self.source = loaders.PairSource(self.data_dir)
        if self.source.settings["size"] != model_config.image_size:
            raise ConfigError(f"{self.data_dir}: records are {self.source.settings['size']} px, "
                              f"config.model.image_size is {model_config.image_size}")
        model = sharding.create_sharded(lambda: DeltaPretrainer(model_config, dtype=compute, rngs=nnx.Rngs(config.seed)),
                                        self.mesh, rules)
        if config.resnet_checkpoint:
            checkpoints.load_resnet_trunk(model, config.resnet_checkpoint)
        for module in (model, self.siglip):
            set_attention(module, config.attention)
            set_scan_layers(module, config.scan_layers)
        set_remat(model, config.remat)  # before the tower joins: the frozen tower keeps nothing
        self.encoder_parameters = parameter_count(model.delta_encoder)
        self.heads_parameters = parameter_count(model) - self.encoder_parameters
        self.graph, self.params, self.frozen, self.rest = optimization.split_trainable(
            with_target_tower(model, self.siglip), config, frozen=FROZEN)
        self.tx, self.schedule, _ = optimization.make_optimizer(config, self.params)
        self.train_step, self.siglip_tokens, self.predict, self.loss_and_grad = make_functions(
            self.graph, self.tx, self.mesh, config.grad_accum_steps)
        self.loader = loaders.pair_loader(self.source, global_batch_size=config.batch_size, seed=config.seed,
                                          workers=config.data_workers, process_index=jax.process_index(),
                                          process_count=jax.process_count())

    def describe(self) -> str:
        return (f"Δ-encoder: {self.encoder_parameters / 1e6:.2f}M parameters (+ {self.heads_parameters / 1e6:.2f}M in the "
                f"pretraining heads); mesh {dict(self.mesh.shape)}; {len(self.source)} training pairs from {self.data_dir}")

    def step(self, params, opt_state, local: dict):
        batch = sharding.global_batch({k: local[k] for k in ("prev_rgb", "rgb", "mv", "residual")}, self.mesh, self.rules)
        return self.train_step(params, opt_state, self.frozen, self.rest, batch)

    def data_order(self, local: dict) -> list:
        return np.stack([local["video"], local["step"]], 1).tolist()  # (record index, step) pairs

    def format_metrics(self, values: dict) -> str:
        return f"loss {values['loss']:.5f} (copy-previous {values['copy_loss']:.5f})"

    def finish(self, params, step: int) -> None:
        """Nothing beyond the checkpoints: stage 2 and cope_jax.convert read the Δ-encoder from them."""


def train(config, workdir: str, evaluators: dict | None = None) -> dict:
    stage = Stage(config, workdir)
    checkpoints.save_stage1_config(config, workdir)
    return loop.train(stage, evaluators)


def evaluate_only(config, workdir: str, evaluators: dict) -> dict:
    """The evaluators on the latest checkpoint of `workdir` (refused when there is none)."""
    loop.require_checkpoint(config, workdir)
    return loop.evaluate_latest(Stage(config, workdir), evaluators)
