"""Stage 1: align the Δ-encoder with SigLIP (paper §3.3, Eq. 7-10; App. C).

Each example is a P step: SigLIP tokens of rgb[t-1] (frozen tower) + the Δ of step t go through
the Δ-encoder and the reference and warped transformers; the loss is the patch-wise MSE against
the frozen SigLIP tokens of rgb[t].
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from cope_jax import checkpoints, sharding
from cope_jax.errors import ConfigError
from cope_jax.models.attention import IMPLEMENTATIONS, set_attention
from cope_jax.models.common import REMAT_POLICIES, set_remat, set_scan_layers
from cope_jax.models.cope.modeling import normalize_frames
from cope_jax.models.delta_encoder.modeling import DeltaEncoder, DeltaEncoderConfig, DeltaPretrainer, parameter_count
from cope_jax.models.siglip.modeling import SiglipVisionConfig, SiglipVisionModel
from cope_jax.training import core as training
from cope_jax.training import loop, retrieval
from cope_jax.training.loop import log
from data_pipeline import loaders, records


def delta_config(config) -> DeltaEncoderConfig:
    try:
        return DeltaEncoderConfig.from_dict(config.model.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None


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
    module = checkpoints.load(config.siglip_checkpoint, mesh=mesh, rules=training.logical_rules(config))
    tower = getattr(module, "vision_tower", module)
    if not isinstance(tower, SiglipVisionModel):
        raise ConfigError(f"config.siglip_checkpoint {config.siglip_checkpoint}: holds a {type(module).__name__}, "
                          "not SigLIP or a LLaVA-Video/CoPE model")
    return tower


def load_resnet_trunk(model: DeltaPretrainer, path: str, *, only_statistics: bool = False) -> None:
    """The residual trunk from a converted ResNet checkpoint; `only_statistics`: just its frozen
    BatchNorm statistics (the trained weights of a stage-1 checkpoint must stay)."""
    if not os.path.isdir(path):
        raise ConfigError(f"config.resnet_checkpoint {path}: no such directory")
    source = checkpoints.load(path)
    trunk = model.delta_encoder.residual_trunk
    if getattr(source, "config", None) != trunk.config:
        raise ConfigError(f"config.resnet_checkpoint {path}: ResNet config {getattr(source, 'config', None)} "
                          f"does not match config.model.resnet {trunk.config}")
    loaded, current = ((nnx.state(source, nnx.BatchStat), nnx.state(trunk, nnx.BatchStat)) if only_statistics
                       else (nnx.state(source), nnx.state(trunk)))
    # Onto the shardings the trunk already has (the loaded copy sits on one local device).
    nnx.update(trunk, sharding.put(loaded, jax.tree.map(lambda x: x.sharding, current)))


def prepare_data(config, workdir: str) -> str:
    """config.data_dir, or demo clips generated and preprocessed under the workdir."""
    if config.data_dir:
        if not os.path.isdir(config.data_dir):
            raise ConfigError(f"config.data_dir {config.data_dir}: no such directory")
        return config.data_dir
    from data_pipeline import preprocess, synthetic

    data_dir = os.path.join(workdir, "demo_data")
    size = config.model.image_size
    if jax.process_index() == 0 and not os.path.exists(os.path.join(data_dir, "manifest.json")):
        log(f"config.data_dir is empty: generating {config.demo_clips} demo clips ({size}x{size}) and preprocessing them")
        synthetic.demo_clips(os.path.join(workdir, "demo_videos"), count=config.demo_clips, size=size)
        code = preprocess.main(["--videos", os.path.join(workdir, "demo_videos"), "--output", data_dir, "--size", str(size),
                                "--gop", "120", "--fusion", "10", "--num-shards", "2", "--workers", "1", "--quiet"])
        if code:
            raise RuntimeError("preprocessing the demo clips failed")
    training.wait_for_process_0("demo data")
    return data_dir


def make_functions(model_graph, siglip_graph, tx, mesh, accumulation: int = 1):
    """Jitted train step (over `accumulation` equal micro-batches), SigLIP tokens and predictions;
    graphdefs are static (closed over)."""

    def loss_fn(params, rest, siglip_state, batch):
        model = nnx.merge(model_graph, params, rest)
        siglip = nnx.merge(siglip_graph, siglip_state)
        prev_tokens = jax.lax.stop_gradient(siglip(normalize_frames(batch["prev_rgb"])))
        target = jax.lax.stop_gradient(siglip(normalize_frames(batch["rgb"]))).astype(jnp.float32)
        predicted = model(prev_tokens, batch["mv"], batch["residual"]).astype(jnp.float32)
        # What copying frame t-1's tokens would score: the bar the Δ path has to beat.
        copy_loss = jnp.mean((prev_tokens.astype(jnp.float32) - target) ** 2)
        return jnp.mean((predicted - target) ** 2), copy_loss

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(params, opt_state, rest, siglip_state, batch):
        # Equal micro-batches: the mean of their means is the batch's mean.
        (loss, copy_loss), grads = jax.tree.map(
            lambda total: total / accumulation,
            training.accumulate_gradients(grad_fn, params, (rest, siglip_state), batch, accumulation))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params, opt_state, {"loss": loss, "copy_loss": copy_loss, "grad_norm": optax.tree.norm(grads)}

    def siglip_tokens(siglip_state, rgb):
        return nnx.merge(siglip_graph, siglip_state)(normalize_frames(rgb)).astype(jnp.float32)

    def predict(params, rest, prev_tokens, mv, residual):
        return nnx.merge(model_graph, params, rest)(prev_tokens, mv, residual).astype(jnp.float32)

    # Evaluation reads these on the host: replicated, so every process holds the whole result
    # even when the parameters are sharded across hosts.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return (jax.jit(train_step, donate_argnums=(0, 1)), jax.jit(siglip_tokens, out_shardings=replicated),
            jax.jit(predict, out_shardings=replicated),
            jax.jit(grad_fn))


def check_accumulation(config, mesh) -> None:
    if not isinstance(config.grad_accum_steps, int) or config.grad_accum_steps < 1:
        raise ConfigError(f"config.grad_accum_steps must be an integer >= 1, got {config.grad_accum_steps!r}")
    training.check_accumulation(config, mesh)


class Stage:
    """Everything built from a config: mesh, models, data, optimizer, checkpoints."""

    def __init__(self, config, workdir: str):
        training.check_positive(config, "total_steps", "batch_size", "checkpoint_every_steps", "eval_every_steps",
                                "log_every_steps", "keep_checkpoints")
        if config.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"config.compute_dtype must be float32 or bfloat16, got {config.compute_dtype!r}")
        if config.attention not in IMPLEMENTATIONS:
            raise ConfigError(f"config.attention must be one of {', '.join(IMPLEMENTATIONS)}, got {config.attention!r}")
        if config.remat not in REMAT_POLICIES:
            raise ConfigError(f"config.remat must be one of {', '.join(REMAT_POLICIES)}, got {config.remat!r}")
        self.config, self.workdir = config, workdir
        self.mesh = training.build_mesh(config)
        check_accumulation(config, self.mesh)
        compute = jnp.dtype(config.compute_dtype)
        model_config = delta_config(config)
        self.siglip = build_siglip(config, compute, mesh=self.mesh)
        if self.siglip.config.image_size != model_config.image_size or self.siglip.config.hidden_size != model_config.width:
            raise ConfigError(f"SigLIP ({self.siglip.config.image_size} px, width {self.siglip.config.hidden_size}) and "
                              f"config.model ({model_config.image_size} px, width {model_config.width}) must agree")
        self.data_dir = prepare_data(config, workdir)
        self.source = loaders.PairSource(self.data_dir)
        if self.source.settings["size"] != model_config.image_size:
            raise ConfigError(f"{self.data_dir}: records are {self.source.settings['size']} px, "
                              f"config.model.image_size is {model_config.image_size}")
        model = sharding.create_sharded(lambda: DeltaPretrainer(model_config, dtype=compute, rngs=nnx.Rngs(config.seed)),
                                        self.mesh, training.logical_rules(config))
        if config.resnet_checkpoint:
            load_resnet_trunk(model, config.resnet_checkpoint)
        for module in (model, self.siglip):
            set_attention(module, config.attention)
            set_scan_layers(module, config.scan_layers)
        set_remat(model, config.remat)
        self.encoder_parameters = parameter_count(model.delta_encoder)
        self.heads_parameters = parameter_count(model) - self.encoder_parameters
        self.model_graph, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.siglip_graph, self.siglip_state = nnx.split(self.siglip)
        self.tx, self.schedule = training.make_optimizer(config)
        self.train_step, self.siglip_tokens, self.predict, self.loss_and_grad = make_functions(
            self.model_graph, self.siglip_graph, self.tx, self.mesh, config.grad_accum_steps)
        self.loader = loaders.pair_loader(self.source, global_batch_size=config.batch_size, seed=config.seed,
                                          workers=config.data_workers, process_index=jax.process_index(),
                                          process_count=jax.process_count())

    def describe(self) -> str:
        return (f"Δ-encoder: {self.encoder_parameters / 1e6:.2f}M parameters (+ {self.heads_parameters / 1e6:.2f}M in the "
                f"pretraining heads); mesh {dict(self.mesh.shape)}; {len(self.source)} training pairs from {self.data_dir}")

    def step(self, params, opt_state, local: dict):
        batch = training.global_batch({k: local[k] for k in ("prev_rgb", "rgb", "mv", "residual")}, self.mesh)
        return self.train_step(params, opt_state, self.rest, self.siglip_state, batch)

    def data_order(self, local: dict) -> list:
        return np.stack([local["video"], local["step"]], 1).tolist()  # (record index, step) pairs

    def format_metrics(self, values: dict) -> str:
        return f"loss {values['loss']:.5f} (copy-previous {values['copy_loss']:.5f})"

    def evaluate(self, params=None) -> dict:
        params = self.params if params is None else params
        videos = records.open(self.data_dir)
        result = retrieval.next_frame_retrieval(
            videos, lambda rgb: self.siglip_tokens(self.siglip_state, rgb),
            lambda prev, mv, residual: self.predict(params, self.rest, prev, mv, residual),
            self.config.eval_max_videos)
        log(retrieval.format_result(result))
        return result

    def finish(self, params, step: int) -> dict:
        return {"retrieval": self.evaluate(params)}


CONFIG_FILE = "config.json"


def save_config(config, workdir: str) -> None:
    """<workdir>/config.json: what `load_delta_encoder` needs to rebuild the model later."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json(indent=1))
        os.replace(path + ".tmp", path)


def train(config, workdir: str) -> dict:
    stage = Stage(config, workdir)
    save_config(config, workdir)
    return loop.train(stage)


def evaluate_only(config, workdir: str) -> dict:
    """Retrieval with the latest checkpoint of `workdir` (refused when there is none)."""
    loop.require_checkpoint(config, workdir)
    stage = Stage(config, workdir)
    loop.restore_latest(stage)
    return stage.evaluate()


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a stage-1 workdir was trained with (<workdir>/config.json)."""
    config_path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.path.exists(config_path):
        raise ConfigError(f"{workdir}: not a stage-1 workdir ({CONFIG_FILE} and checkpoints/ expected) "
                          "nor a cope_jax checkpoint")
    try:
        with open(config_path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except ValueError as e:
        raise ConfigError(f"{config_path}: not valid JSON ({e})") from None


def load_delta_encoder(path: str) -> tuple[DeltaEncoder, dict]:
    """The trained Δ-encoder of a stage-1 workdir (its latest committed step), or of a cope_jax
    checkpoint holding one (kind `delta_encoder` or `cope`) -> (module, {"source", "step"}).

    The pretraining heads are dropped; the ResNet trunk's frozen BatchNorm statistics, which stage
    1 never changes and does not checkpoint, come back from `config.resnet_checkpoint` as in training.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(os.path.join(path, checkpoints.MODEL_FILE)):
        module = checkpoints.load(path)
        encoder = module if isinstance(module, DeltaEncoder) else getattr(module, "delta_encoder", None)
        if not isinstance(encoder, DeltaEncoder):
            raise ConfigError(f"{path}: holds a {type(module).__name__}, not a Δ-encoder or a CoPE model")
        return encoder, {"source": path, "step": checkpoints.read_meta(path).get("step")}
    config = read_config(path)
    ckpt = training.Checkpoints(path, config.keep_checkpoints, config.checkpoint_every_steps)
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"{path}: no committed checkpoint under checkpoints/ (has stage 1 saved yet?)")
    model = nnx.eval_shape(lambda: DeltaPretrainer(delta_config(config), rngs=nnx.Rngs(0)))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), params)
    rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest)  # BatchNorm statistics: replaced below
    try:
        params = ckpt.restore_params(step, params)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise ConfigError(f"{ckpt.directory}: cannot restore step {step} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    finally:
        ckpt.close()
    model = nnx.merge(graph, params, rest)
    fresh = DeltaEncoder(model.config, rngs=nnx.Rngs(0))  # BatchNorm statistics as initialised in stage 1
    nnx.update(model.delta_encoder, nnx.state(fresh, nnx.BatchStat))
    if config.resnet_checkpoint:
        load_resnet_trunk(model, config.resnet_checkpoint, only_statistics=True)
    return model.delta_encoder, {"source": path, "step": int(step)}


__all__ = ["train", "evaluate_only", "Stage", "load_delta_encoder"]
