"""Every checkpoint cope_jax reads or writes (orbax underneath).

- A model (converted or trained): `save` / `load` / `read_meta`. The directory holds `model.json`
  (model kind, config, dtype, where it came from) and `params/`. Loading rebuilds the module
  abstractly and restores every array straight into the current device layout, so a checkpoint
  written on 8 devices loads on 1 and vice versa.
- A CoPE checkpoint (docs/architecture.md §7) adds the video settings and the Δ-encoder's provenance
  (`cope_checkpoint_info`) and the tokenizer files (`TOKENIZER_FILES`, `copy_tokenizer_files`);
  stage 2 writes one with `export`, `cope_jax.convert` assembles one from LLaVA-Video.
- `written_atomically`: the one writer of a checkpoint directory (aside, then renamed into place).
- Training: `Checkpoints`, the manager of <workdir>/checkpoints (`params`, `opt_state`, the process
  count that wrote them); a stage-1 workdir's config (`save_stage1_config`, `read_stage1_config`)
  and trained Δ-encoder (`load_delta_encoder`); a converted ResNet trunk (`load_resnet_trunk`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from cope_jax import sharding
from cope_jax.distributed import wait_for_process_0
from cope_jax.errors import ConfigError, UserError
from cope_jax.models import KINDS, config_from_dict, config_to_dict, kind_of
from cope_jax.models.delta_encoder.modeling import DeltaEncoder, DeltaEncoderConfig, DeltaPretrainer

MODEL_FILE = "model.json"
PARAMS_DIR = "params"
TRAINING_DIR = "checkpoints"  # under a training workdir
STAGE1_CONFIG_FILE = "config.json"  # beside it in a stage-1 workdir
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")


class CheckpointError(UserError):
    """A checkpoint directory is missing, incomplete or not a cope_jax checkpoint."""


def _dtype_of(module: nnx.Module) -> str:
    leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))]
    return str(np.dtype(leaves[0].dtype)) if leaves else "float32"


def _largest_array_bytes(state) -> int:
    return max((leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state)), default=0)


def save(directory: str, module: nnx.Module, **info) -> None:
    """Writes `module` (weights + what is needed to rebuild it) to a new directory."""
    directory = os.path.abspath(directory)
    kind = kind_of(module)
    state = nnx.state(module)
    # Synchronous, with a bounded window of arrays copied to host and in flight: by default orbax
    # stages a host copy of the whole state before writing, doubling peak memory (BENCHMARKS.md).
    window_gb = max(_largest_array_bytes(state), 2**28) / 1e9
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=window_gb, save_device_host_concurrent_gb=window_gb)
    # Every process of a multi-process run calls this: orbax writes each process's shards.
    ocp.Checkpointer(handler).save(os.path.join(directory, PARAMS_DIR), args=ocp.args.PyTreeSave(state))
    if jax.process_index() == 0:
        meta = {"kind": kind, "config": config_to_dict(module.config), "dtype": _dtype_of(module), **info}
        with open(os.path.join(directory, MODEL_FILE), "w") as f:
            json.dump(meta, f, indent=2)


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, MODEL_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory}: not a cope_jax checkpoint (no {MODEL_FILE}; convert with python -m cope_jax.convert)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if meta.get("kind") not in KINDS:
        raise CheckpointError(f"{path}: unknown model kind {meta.get('kind')!r}")
    return meta


def load(directory: str, *, mesh=None, rules=sharding.DEFAULT_RULES, dtype=None, param_dtype=None) -> nnx.Module:
    """Rebuilds the saved module; with `mesh`, each weight lands on its shard. `dtype` (compute)
    and `param_dtype` default to the saved dtype; given, weights are cast while restoring (e.g. a
    bfloat16 checkpoint into float32 master weights for training)."""
    directory = os.path.abspath(directory)
    meta = read_meta(directory)
    module_class, _ = KINDS[meta["kind"]]
    config = config_from_dict(meta["kind"], meta["config"])
    dtype, param_dtype = dtype or meta["dtype"], param_dtype or meta["dtype"]
    abstract = nnx.eval_shape(lambda: module_class(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_state)
    else:
        shardings = sharding.state_shardings(abstract_state, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    try:
        state = ocp.StandardCheckpointer().restore(os.path.join(directory, PARAMS_DIR), target)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{directory}: cannot restore weights ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------- writing a directory


@contextlib.contextmanager
def written_atomically(path: str):
    """Yields a directory beside `path` to write into; when the block finishes it replaces `path`
    in one rename, and on failure it is removed, so `path` is never half written. Every process of a
    multi-process run enters (orbax writes each one's shards); process 0 alone creates and renames."""
    path = os.path.abspath(path)
    # One name all processes of a run know; a lone process adds its pid, so two jobs never share one.
    partial = f"{path}.partial" if jax.process_count() > 1 else f"{path}.partial-{os.getpid()}"
    leader = jax.process_index() == 0
    if leader:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    wait_for_process_0("checkpoint directory created")
    try:
        yield partial
        wait_for_process_0("checkpoint written")
        if leader:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(partial, path)
        wait_for_process_0("checkpoint in place")
    finally:
        if leader:
            shutil.rmtree(partial, ignore_errors=True)


# ---------------------------------------------------------------------------- CoPE checkpoints and tokenizers


def cope_checkpoint_info(model, delta_info: dict | None, video_settings) -> dict:
    """What model.json records for a CoPE checkpoint beyond the model config (docs/architecture.md §7):
    the video settings (frames preprocessed at the tower's image size) and where the Δ-encoder came from."""
    preprocessing = dataclasses.replace(video_settings.preprocessing, size=model.config.vision.image_size)
    settings = dataclasses.replace(video_settings, preprocessing=preprocessing)
    return {"video": settings.to_dict(), "delta_encoder": dict(delta_info or {}, random=delta_info is None)}


def export(path: str, model, tokenizer, video_settings, delta_info: dict | None, **info) -> str:
    """A trained CoPE-VideoLM as a CoPE checkpoint with its tokenizer, for chat and evaluation."""
    # Trained either way; without a stage-1 Δ-encoder it started random (paper App. H.2), which the source says.
    info |= cope_checkpoint_info(model, delta_info or {"source": "random initialisation, trained in stage 2"},
                                 video_settings)
    with written_atomically(path) as partial:
        if jax.process_index() == 0:
            tokenizer.save_pretrained(partial)
        save(partial, model, **info)
    return path


def copy_tokenizer_files(source: str, destination: str) -> list[str]:
    """The source's tokenizer (and chat template / generation config) files, copied as they are."""
    directory = source if os.path.isdir(source) else os.path.dirname(source)
    copied = []
    for path in sorted(glob.glob(os.path.join(directory, "*"))):
        if os.path.basename(path) in TOKENIZER_FILES:
            shutil.copy2(path, destination)
            copied.append(os.path.basename(path))
    return copied


# ---------------------------------------------------------------------------- training checkpoints


class Checkpoints:
    """<workdir>/checkpoints: an orbax `CheckpointManager` holding `params`, `opt_state` and the
    number of processes that wrote them (`run`). The data needs no state: resuming starts the loader
    at global batch = step (loaders.GlobalBatchSampler). Saves are asynchronous and bounded (keep-N);
    a restore takes the latest *committed* step and lands each array on the current mesh, so 8
    devices -> 1 and back works."""

    def __init__(self, workdir: str, keep: int, every: int):
        self.every = every
        self.directory = os.path.join(os.path.abspath(workdir), TRAINING_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @classmethod
    def of(cls, config, workdir: str) -> "Checkpoints":
        return cls(workdir, config.keep_checkpoints, config.checkpoint_every_steps)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, *, force: bool = False) -> bool:
        """Saves when `step` is due (or `force`); a step already saved is left as it is. No data
        iterator state: the data position is a function of the step (loaders.GlobalBatchSampler),
        which also holds when another number of processes or grain workers resumes."""
        if (step % self.every and not force) or step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                                  run=ocp.args.JsonSave({"process_count": jax.process_count()}))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, params, opt_state) -> tuple[Any, Any]:
        """Restores `step` with the shapes, dtypes and shardings of the given (current) trees."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params)),
                                  opt_state=ocp.args.StandardRestore(_abstract(opt_state)))
        try:
            restored = self.manager.restore(step, args=args)
        except ValueError as e:  # orbax: the trees' structures or shapes differ
            raise CheckpointError(
                f"{self.directory}/{step}: does not match this run ({str(e).splitlines()[0]}): the model, the trainable "
                "parameters, the learning-rate groups or the cope_jax version differ from those that wrote it; resume "
                "with the same config and version, or use a new workdir") from None
        return restored["params"], restored["opt_state"]

    def written_by(self, step: int) -> int | None:
        """How many processes wrote `step` (None: a checkpoint from before this was recorded)."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "run")):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]["process_count"]

    def restore_params(self, step: int, params):
        """Only the parameters of `step` (what inference and checkpoint assembly need)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params))))
        return restored["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ---------------------------------------------------------------------------- stage-1 workdirs


def save_stage1_config(config, workdir: str) -> None:
    """<workdir>/config.json: what `load_delta_encoder` needs to rebuild the model later."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, STAGE1_CONFIG_FILE)
        with open(path + ".tmp", "w") as f:
            f.write(config.to_json(indent=1))
        os.replace(path + ".tmp", path)


def read_stage1_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a stage-1 workdir was trained with (<workdir>/config.json)."""
    config_path = os.path.join(workdir, STAGE1_CONFIG_FILE)
    if not os.path.isdir(os.path.join(workdir, TRAINING_DIR)) or not os.path.exists(config_path):
        raise ConfigError(f"{workdir}: not a stage-1 workdir ({STAGE1_CONFIG_FILE} and {TRAINING_DIR}/ expected) "
                          "nor a cope_jax checkpoint")
    try:
        with open(config_path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except ValueError as e:
        raise ConfigError(f"{config_path}: not valid JSON ({e})") from None


def stage1_delta_config(config) -> DeltaEncoderConfig:
    """The Δ-encoder a stage-1 config (`config.model`) describes."""
    try:
        return DeltaEncoderConfig.from_dict(config.model.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None


def load_resnet_trunk(model: DeltaPretrainer, path: str, *, only_statistics: bool = False) -> None:
    """The residual trunk from a converted ResNet checkpoint; `only_statistics`: just its frozen
    BatchNorm statistics (the trained weights of a stage-1 checkpoint must stay)."""
    if not os.path.isdir(path):
        raise ConfigError(f"config.resnet_checkpoint {path}: no such directory")
    source = load(path)
    trunk = model.delta_encoder.residual_trunk
    if getattr(source, "config", None) != trunk.config:
        raise ConfigError(f"config.resnet_checkpoint {path}: ResNet config {getattr(source, 'config', None)} "
                          f"does not match config.model.resnet {trunk.config}")
    loaded, current = ((nnx.state(source, nnx.BatchStat), nnx.state(trunk, nnx.BatchStat)) if only_statistics
                       else (nnx.state(source), nnx.state(trunk)))
    # Onto the shardings the trunk already has (the loaded copy sits on one local device).
    nnx.update(trunk, sharding.put(loaded, jax.tree.map(lambda x: x.sharding, current)))


def load_delta_encoder(path: str) -> tuple[DeltaEncoder, dict]:
    """The trained Δ-encoder of a stage-1 workdir (its latest committed step), or of a cope_jax
    checkpoint holding one (kind `delta_encoder` or `cope`) -> (module, {"source", "step"}).

    The pretraining heads are dropped; the ResNet trunk's frozen BatchNorm statistics, which stage
    1 never changes and does not checkpoint, come back from `config.resnet_checkpoint` as in training.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(os.path.join(path, MODEL_FILE)):
        module = load(path)
        encoder = module if isinstance(module, DeltaEncoder) else getattr(module, "delta_encoder", None)
        if not isinstance(encoder, DeltaEncoder):
            raise ConfigError(f"{path}: holds a {type(module).__name__}, not a Δ-encoder or a CoPE model")
        return encoder, {"source": path, "step": read_meta(path).get("step")}
    config = read_stage1_config(path)
    ckpt = Checkpoints.of(config, path)
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"{path}: no committed checkpoint under {TRAINING_DIR}/ (has stage 1 saved yet?)")
    model = nnx.eval_shape(lambda: DeltaPretrainer(stage1_delta_config(config), rngs=nnx.Rngs(0)))
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
