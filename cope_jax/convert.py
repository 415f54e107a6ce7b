"""PyTorch / HF checkpoints -> cope_jax models, strictly and one tensor at a time.

    python -m cope_jax.convert --source DIR_OR_FILE --output DIR [--dtype bfloat16]

Layouts are recognised from config.json (`model_type`) and the tensor names:

  HF Qwen2ForCausalLM                       -> cope_jax.models.qwen2.Qwen2ForCausalLM
  HF SiglipVisionModel / SiglipModel        -> cope_jax.models.siglip.SiglipVisionModel
  HF ResNetModel / ResNetForImageClassification, torchvision resnet18 state dict (.pth, no config)
                                            -> cope_jax.models.resnet.ResNet
  LLaVA-NeXT llava_qwen (lmms-lab/LLaVA-Video-7B-Qwen2), HF LlavaOnevisionForConditionalGeneration
  (legacy `language_model.model.*` and current `model.language_model.*` names)
                                            -> cope_jax.models.cope.CoPEVideoLM

A CoPE checkpoint (what `python -m cope_jax.chat` and `cope_jax.evaluate` load) is a LLaVA-Video
source plus the Δ-encoder trained by stage 1 (`--delta-encoder`: its workdir, or a cope_jax
checkpoint holding one). Without `--delta-encoder` the Δ-encoder is random, and model.json says so.
The source's tokenizer files are copied beside the weights, and every setting that changes what
the model reads from a video (pool mode, fps, gop, fusion, size, keyframes per GOP, time
instruction, ...) is recorded in model.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax.numpy as jnp
from flax import nnx

from cope_jax.errors import UserError
from cope_jax import checkpoints, sharding
from cope_jax.models.common import resolve_dtype
from cope_jax.models.cope import params as cope_params
from cope_jax.models.cope.modeling import CoPEVideoLM, check_delta_fits_tower
from cope_jax.models.delta_encoder.modeling import DeltaEncoder
from cope_jax.models.qwen2 import params as qwen2_params
from cope_jax.models.qwen2.modeling import Qwen2ForCausalLM
from cope_jax.models.resnet import params as resnet_params
from cope_jax.models.resnet.modeling import ResNet
from cope_jax.models.siglip import params as siglip_params
from cope_jax.models.siglip.modeling import SiglipVisionModel
from cope_jax.video.settings import VideoSettings
from cope_jax.video.switches import TIME_INSTRUCTIONS
from cope_jax.weights import CheckpointReader, ConversionError, Rule, apply_rules, ignore, read_config, with_prefix


@dataclasses.dataclass
class Plan:
    """What a checkpoint is: the module to build, its config and the weight map."""

    layout: str
    module_class: type
    config: object
    rules: list[Rule]


def _plan_qwen2(hf, keys, source):
    config = qwen2_params.config_from_hf(hf, source)
    return Plan("hf_qwen2", Qwen2ForCausalLM, config, qwen2_params.rules(config))


def _plan_siglip(hf, keys, source):
    vision = hf.get("vision_config", hf) if hf.get("model_type") == "siglip" else hf
    # transformers < 5 and SiglipModel files nest the tower under `vision_model.`; 5.x
    # SiglipVisionModel files do not.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
    config = siglip_params.config_from_hf(vision, source, use_post_layernorm=any(k.startswith(prefix + "post_layernorm.") for k in keys))
    text_ignores = [ignore(r"text_model\..*", "SigLIP text tower"), ignore(r"logit_(scale|bias)", "contrastive head")]
    return Plan("hf_siglip", SiglipVisionModel, config, siglip_params.rules(config, prefix) + text_ignores)


def _plan_hf_resnet(hf, keys, source):
    config = resnet_params.config_from_hf(hf, source)
    prefix = "resnet." if any(k.startswith("resnet.") for k in keys) else ""
    rules = with_prefix(resnet_params.HF_RULES, prefix, "") + [ignore(r"classifier\..*", "classifier head")]
    return Plan("hf_resnet", ResNet, config, rules)


def _plan_torchvision_resnet(keys, source):
    return Plan("torchvision_resnet", ResNet, resnet_params.torchvision_config(keys, source), resnet_params.torchvision_rules())


def _plan_llava(hf, keys, source):
    layout = cope_params.detect_layout(hf, keys)
    vision_prefix = cope_params.vision_prefix(layout, keys)
    source_layers = siglip_params.count_layers(keys, vision_prefix)
    if layout == "llava_next":
        config = cope_params.config_from_llava_next(hf, source, source_layers)
    else:
        config = cope_params.config_from_onevision(hf, source, source_layers)
    return Plan(layout, CoPEVideoLM, config, cope_params.rules(layout, config, vision_prefix, source_layers))


PLANNERS = {
    "qwen2": _plan_qwen2,
    "siglip_vision_model": _plan_siglip,
    "siglip": _plan_siglip,
    "resnet": _plan_hf_resnet,
    "llava_qwen": _plan_llava,
    "llava_onevision": _plan_llava,
}


def plan_conversion(path: str, reader: CheckpointReader) -> Plan:
    hf = read_config(path)
    keys = reader.keys()
    if hf is None:
        if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
            return _plan_torchvision_resnet(keys, path)
        raise ConversionError(f"{path}: no config.json and the tensors are not a torchvision ResNet state dict; "
                              "cannot tell the model")
    model_type = hf.get("model_type")
    if model_type not in PLANNERS:
        raise ConversionError(f"{path}: unknown model_type {model_type!r} in config.json (supported: {', '.join(PLANNERS)})")
    return PLANNERS[model_type](hf, keys, path)


def _delta_encoder_weights(plan: Plan, path: str, delta_encoder: DeltaEncoder | None, dtype) -> tuple[Plan, nnx.State]:
    """The Δ-encoder a LLaVA-Video source lacks: the given one (its config joins the model's), or
    a freshly initialised one at the paper's sizes for the source's tower."""
    if delta_encoder is None:
        delta_encoder = DeltaEncoder(plan.config.delta, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    else:
        try:
            check_delta_fits_tower(delta_encoder.config, plan.config.vision)
        except ValueError as e:
            raise ConversionError(f"{path}: {e}") from None
        plan = dataclasses.replace(plan, config=dataclasses.replace(plan.config, delta=delta_encoder.config))
    return plan, nnx.State({"delta_encoder": nnx.state(delta_encoder)})


def from_pytorch(path: str, dtype=jnp.float32, *, mesh=None, rules=None, progress: bool = False,
                 delta_encoder: DeltaEncoder | None = None) -> nnx.Module:
    """Loads a PyTorch/HF checkpoint (directory or file) as a cope_jax NNX module with weights.

    With `mesh`, every weight is placed straight onto its shard (logical rules from `rules`). A
    LLaVA-Video source becomes a CoPEVideoLM with `delta_encoder` (else a random one).
    Raises ConversionError naming the file and every problem found.
    """
    dtype = resolve_dtype(dtype)
    reader = CheckpointReader(path)
    plan = plan_conversion(path, reader)
    defaults = None
    if plan.module_class is CoPEVideoLM:
        plan, defaults = _delta_encoder_weights(plan, path, delta_encoder, dtype)
    elif delta_encoder is not None:
        raise ConversionError(f"{path}: a Δ-encoder joins a LLaVA-Video checkpoint, but this is {plan.layout}")
    abstract = nnx.eval_shape(lambda: plan.module_class(plan.config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    shardings = None
    if mesh is not None:
        shardings = sharding.state_shardings(nnx.state(abstract), mesh, rules or sharding.DEFAULT_RULES)
    return apply_rules(reader, plan.rules, abstract, shardings=shardings, progress=progress, defaults=defaults)


def convert(source: str, output: str, dtype="float32", overwrite: bool = False, progress: bool = True,
            delta_encoder: str | None = None, video_settings=None) -> nnx.Module:
    """from_pytorch + checkpoints.save, written to a temporary directory and renamed at the end.

    `delta_encoder`: a stage-1 workdir or cope_jax checkpoint to assemble a CoPE checkpoint with;
    `video_settings`: the video.settings.VideoSettings to record (LLaVA-Video sources only)."""
    output = os.path.abspath(os.path.expanduser(output))
    source = os.path.abspath(os.path.expanduser(source))
    if os.path.exists(output) and not overwrite:
        raise ConversionError(f"{output}: output already exists (pass --overwrite to replace it)")
    encoder, delta_info = None, None
    if delta_encoder:
        try:
            encoder, delta_info = checkpoints.load_delta_encoder(delta_encoder)
        except UserError as e:
            raise ConversionError(f"--delta-encoder {e}") from None
    model = from_pytorch(source, dtype, progress=progress, delta_encoder=encoder)
    info = {"source": source}
    if isinstance(model, CoPEVideoLM):
        info |= checkpoints.cope_checkpoint_info(model, delta_info, video_settings or VideoSettings())
    with checkpoints.written_atomically(output) as partial:
        info["tokenizer_files"] = checkpoints.copy_tokenizer_files(source, partial)
        checkpoints.save(partial, model, **info)
    return model


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cope_jax.convert",
        description=__doc__.split("\n\n", 1)[1] if "\n\n" in __doc__ else __doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  python -m cope_jax.convert --source ~/ckpt/LLaVA-Video-7B-Qwen2 --output ~/jax/llava-video-7b "
               "--dtype bfloat16\n  python -m cope_jax.convert --source ~/ckpt/LLaVA-Video-7B-Qwen2 --delta-encoder "
               "~/runs/pretrain --output ~/jax/cope-7b --dtype bfloat16   # a CoPE checkpoint for cope_jax.chat"
               "\n\nLoad the result with cope_jax.checkpoints.load(DIR). Nothing is downloaded: "
               "--source must be a local directory (config.json + *.safetensors or *.bin) or a .pth/.pt file.",
    )
    parser.add_argument("--source", required=True, help="local HF/LLaVA checkpoint directory, or a torchvision .pth/.pt file")
    parser.add_argument("--output", required=True, help="directory to write the cope_jax checkpoint to (must not exist)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype of the converted model (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    cope = parser.add_argument_group(
        "CoPE checkpoint (LLaVA-Video sources)",
        "The Δ-encoder to join, and the video settings chat and evaluation will use by default "
        "(recorded in model.json; they can be overridden per run).")
    cope.add_argument("--delta-encoder", metavar="PATH",
                      help="stage-1 workdir (python -m cope_jax.main --config=configs/pretrain.py) or a cope_jax "
                           "checkpoint holding a Δ-encoder; omitted: a RANDOM Δ-encoder (model.json says so)")
    defaults = VideoSettings()
    for flag, field, kind, text in [
            ("--fps", "fps", float, "frames per second of the canonical stream"),
            ("--gop", "gop", int, "frames per GOP"),
            ("--fusion", "fusion", int, "frames fused into one step (30 at 30 fps = 1 step/s; paper App. H.5: 15, 10)")]:
        cope.add_argument(flag, type=kind, default=getattr(defaults.preprocessing, field),
                          help=f"{text} (default %(default)s)")
    cope.add_argument("--keyframes-per-gop", type=int, default=defaults.keyframes_per_gop,
                      help="keyframes per GOP, the other steps are P steps (default %(default)s, as fine-tuned: App. C)")
    cope.add_argument("--max-gops", type=int, default=defaults.max_gops, help="longer videos are sampled uniformly by GOP (default %(default)s)")
    cope.add_argument("--time-instruction", choices=list(TIME_INSTRUCTIONS), default=defaults.time_instruction,
                      help="the preamble after the video: full = LLaVA-Video's, with every step's time (default); "
                           "duration = its length and step count only; none")
    cope.add_argument("--no-time-instruction", dest="time_instruction", action="store_const", const="none",
                      help="the same as --time-instruction none")
    return parser


def video_settings_from_args(args) -> VideoSettings:
    return VideoSettings().with_switches(
        where="video settings", error=ConversionError, fps=args.fps, gop=args.gop, fusion=args.fusion,
        keyframes_per_gop=args.keyframes_per_gop, max_gops=args.max_gops, time_instruction=args.time_instruction)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        model = convert(args.source, args.output, args.dtype, overwrite=args.overwrite,
                        delta_encoder=args.delta_encoder, video_settings=video_settings_from_args(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    count = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model)))
    print(f"converted {args.source} -> {args.output}: {type(model).__name__}, {count:,} weights, "
          f"{args.dtype}, {time.perf_counter() - start:.1f}s")
    if isinstance(model, CoPEVideoLM) and not args.delta_encoder:
        print("NOTE: no --delta-encoder: the Δ-encoder is RANDOM (recorded in model.json); P steps carry no "
              "information until it is trained (stage 1) or fine-tuned (stage 2)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
