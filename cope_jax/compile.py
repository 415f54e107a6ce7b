"""`--mode=compile --target=NAME`: the stage's real train step compiled for an accelerator that is not
here, and whether it fits (docs/architecture.md §11).

The step is the one `--mode=train` runs (the stage's own `make_functions`: same shardings,
donation, accumulation, remat, attention kernels, layer scan) on abstract weights (`nnx.eval_shape`:
nothing is materialised), with its inputs as `ShapeDtypeStruct`s on a mesh of the target's devices
from the accelerator's own compiler (`accelerators.devices`). Stage 2 compiles one program per
length bucket. Per device the report gives parameters, optimizer state, batch, gradients, the
compiler's other temporaries and its total; the chip's memory and whether it fits; which kernel
each model's attention compiled to (read from the compiled HLO); compile time; the model FLOPs of a
step (counted on the program's jaxpr) and the throughput per chip that 45% MFU means.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from cope_jax import accelerators, checkpoints, sharding
from cope_jax.errors import ConfigError
from cope_jax.models.attention import set_attention
from cope_jax.models.common import set_remat, set_scan_layers
from cope_jax.models.cope.modeling import CoPEConfig, CoPEVideoLM
from cope_jax.models.delta_encoder.modeling import SCOPE as DELTA_SCOPE
from cope_jax.models.delta_encoder.modeling import DeltaPretrainer
from cope_jax.inference import generation
from cope_jax.inference.generation import SamplingConfig
from cope_jax.models.qwen2.modeling import SCOPE as LLM_SCOPE
from cope_jax.models.qwen2.modeling import KVCache, Qwen2ForCausalLM
from cope_jax.models.siglip.modeling import SCOPE as TOWER_SCOPE
from cope_jax.models.siglip.modeling import SiglipVisionConfig, SiglipVisionModel
from cope_jax.training import finetune, optimization, pretrain
from data_pipeline import codec, records

GiB = 2**30
MFU = 0.45
# Stage 2 plans for the longest video a sample may hold: as many GOPs as fit config.max_seq_len
# beside this much text (time instruction, question, answer), which is what the data's padded
# keyframe and P-step slots come to when any video is long enough. GOPs are those of
# config.data_dir's preprocessing, else of the demo clips (run_pretrain) or the preprocessing defaults.
TEXT_TOKENS = 256
DEMO_PREPROCESSING = codec.Settings(gop=120, fusion=10)  # the built-in demo clips (training.demo)
# Deviceless GPU compiles have no autotuner, and XLA's Triton GEMM emitter then finds no tile for
# some of the tower's projections ("Couldn't find output tile sizes"): cuBLAS takes every GEMM.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
COMPONENTS = (LLM_SCOPE, TOWER_SCOPE, DELTA_SCOPE)
# Host memory one 7B compile may take, by platform (RSS of two programs at once: 4.9 GB for h100-8;
# the TPU compiler's 16,384 program beside chat's prefill: 17.0 GB for v5p-16, 20.4 GB for v6e-64).
HOST_BYTES_PER_COMPILE = {"gpu": 3 * GiB, "tpu": 14 * GiB}


@dataclasses.dataclass
class Program:
    """One program to compile: how to lower it, what its arguments hold per device, what it processes."""

    label: str
    lower: Callable[[], jax.stages.Lowered]
    parameters: int  # bytes per device of the weights among the arguments
    optimizer_state: int
    batch: int  # the batch (training) or the KV cache and prompt (inference)
    gradients: int = 0  # fp32 gradients, among the compiler's temporaries
    items: int = 0  # tokens (stage 2) or P-step examples (stage 1) per step
    item_name: str = ""
    flops: Callable[[], float] | None = None  # model FLOPs of one step
    on_mesh: bool = True  # traced under the mesh (training); False: one chip (chat)


def train_program(label: str, step, args: tuple, params, items: int, item_name: str, flops) -> Program:
    """A train step `step(params, opt_state, *other_state, batch)` on abstract `args`."""
    _, opt_state, *others, batch = args
    return Program(label, lambda: step.lower(*args), parameters=per_device_bytes((params, others)),
                   optimizer_state=per_device_bytes(opt_state), batch=per_device_bytes(batch),
                   gradients=sum(math.prod(x.sharding.shard_shape(x.shape)) * 4 for x in jax.tree.leaves(params)),
                   items=items, item_name=item_name, flops=flops)


# ---------------------------------------------------------------------------- the entry point


def run(config, target_name: str) -> int:
    """Compiles every train-step program of `config` for `target_name` and prints the report.
    0: every program fits; 1: one does not (its one line on stderr)."""
    target = accelerators.parse(target_name)
    devices = accelerators.devices(target)
    mesh = build_mesh(config, devices)
    programs = stage_programs(config, mesh, target)
    print(header(config, target, mesh))
    start, workers = time.perf_counter(), compile_workers(len(programs), target.platform)
    rows, failure = [], None
    for row in compile_all(programs, mesh, target, workers):
        rows.append(row)
        print(format_row(row, target), flush=True)
        failure = failure or row.get("failure")
    print(format_kernels(rows))
    print(format_flops(rows, target))
    print(f"\n{len(rows)} programs compiled for {target.name} in {time.perf_counter() - start:.0f} s "
          f"({workers} at a time)")
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


def compile_workers(programs: int, platform: str) -> int:
    """Programs compiled at once: a core each (XLA:GPU's passes run on one; XLA:TPU uses more, so
    there the gain is smaller), as host memory allows (HOST_BYTES_PER_COMPILE each)."""
    return max(1, min(programs, os.cpu_count() or 1, available_host_bytes() // HOST_BYTES_PER_COMPILE[platform]))


def available_host_bytes() -> int:
    """What the kernel says new allocations can take (MemAvailable: free memory and reclaimable cache)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def compile_all(programs: list[Program], mesh, target, workers: int):
    """Rows in program order (mesh None: programs on one chip). Each program is lowered here, in
    turn (tracing is not thread-safe; under the mesh, kernels that run per shard, splash attention,
    find it), and compiled on a thread pool: the compilers release the GIL."""
    def lowered(program):
        print(f"[{time.strftime('%H:%M:%S')}] lowering {program.label} for {target.name}, then compiling it ...",
              file=sys.stderr, flush=True)
        if too_large(program, target):
            return None
        with jax.set_mesh(mesh) if program.on_mesh and mesh is not None else contextlib.nullcontext():
            return program.lower()

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(compile_program, program, lowered(program), target) for program in programs]
        for program, future in zip(programs, futures):
            row = future.result()
            if program.flops is not None and "total" in row and "kernels" in row:
                start = time.perf_counter()
                row["model_flops"] = program.flops()  # traced here, not on the pool
                row["flops_s"] = time.perf_counter() - start
            yield row


def build_mesh(config, devices) -> jax.sharding.Mesh:
    shape = {axis: int(size) for axis, size in dict(config.mesh).items()}
    try:
        return sharding.make_mesh(shape, devices)
    except ValueError as e:
        raise ConfigError(f"config.mesh {shape}: {e} ({len(devices)} devices on the target)") from None


def stage_programs(config, mesh, target) -> list[Program]:
    builders = {"finetune": finetune_programs, "pretrain": pretrain_programs}
    if config.stage not in builders:
        raise ConfigError(f"config.stage {config.stage!r} is not one of {sorted(builders)}")
    return builders[config.stage](config, mesh, target)


# ---------------------------------------------------------------------------- stage 2


def finetune_model_config(config) -> CoPEConfig:
    """The model `--mode=train` builds: config.model, with the tower and Δ-encoder of stage 1 when
    the run starts with it (finetune.random_model)."""
    try:
        model_config = CoPEConfig.from_dict(config.model.to_dict())
        if config.run_pretrain:
            model_config = dataclasses.replace(model_config, vision=SiglipVisionConfig(**dict(config.pretrain.siglip)),
                                               delta=checkpoints.stage1_delta_config(config.pretrain))
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config.model: {e}") from None
    return model_config


def video_slots(config, model_config: CoPEConfig) -> tuple[int, int]:
    """(keyframe slots, P-step slots) per sample: the most GOPs that fit max_seq_len beside TEXT_TOKENS."""
    if config.data_dir:
        preprocessing = codec.Settings.from_dict(records.read_manifest(config.data_dir)["settings"])
    else:  # the built-in pipeline's demo clips, else what preprocessing writes by default (paper §4.1)
        preprocessing = DEMO_PREPROCESSING if config.run_pretrain else codec.Settings()
    steps = preprocessing.gop // preprocessing.fusion
    keyframes = min(config.keyframes_per_gop, steps)
    per_gop = keyframes * model_config.tokens_per_keyframe + (steps - keyframes) * model_config.tokens_per_p_step
    gops = min(config.max_gops, (config.max_seq_len - TEXT_TOKENS) // per_gop)
    if gops < 1:
        raise ConfigError(f"config.max_seq_len {config.max_seq_len}: one GOP ({per_gop} visual tokens) and "
                          f"{TEXT_TOKENS} text tokens do not fit")
    return gops * keyframes, gops * (steps - keyframes)


def finetune_programs(config, mesh, target) -> list[Program]:
    finetune.check_config(config)
    config = optimization.with_accumulation(config, mesh)
    accumulation = config.grad_accum_steps
    model_config = finetune_model_config(config)
    compute = jnp.dtype(config.compute_dtype)
    model = nnx.eval_shape(lambda: CoPEVideoLM(model_config, dtype=compute, param_dtype="float32", rngs=nnx.Rngs(0)))
    set_remat(model, config.remat)
    set_attention(model, config.attention, platform=target.platform)
    set_scan_layers(model, config.scan_layers)
    rules = sharding.logical_rules(config)
    graph, params, frozen, rest = (place(tree, mesh, rules) if i else tree
                                   for i, tree in enumerate(optimization.split_trainable(model, config)))
    tx, _, _ = optimization.make_optimizer(config, params)
    opt_state = optimizer_state(tx, params, mesh)
    train_step, _ = finetune.make_functions(graph, tx, config)
    keyframes, p_steps = video_slots(config, model_config)
    visual = keyframes * model_config.tokens_per_keyframe + p_steps * model_config.tokens_per_p_step
    size = model_config.vision.image_size
    programs = []
    for length in sorted(config.length_buckets):
        batch = stage2_batch(config.batch_size, length, keyframes, p_steps, min(visual, length), size,
                             sharding.batch_sharding(mesh, rules))
        micro = stage2_batch(config.batch_size // accumulation, length, keyframes, p_steps, min(visual, length), size)
        flops = _finetune_flops(graph, params, frozen, rest, micro, config, model_config, length, accumulation)
        programs.append(train_program(f"L={length}", train_step, (params, opt_state, frozen, rest, batch), params,
                                      config.batch_size * length, "tokens", flops))
    return programs + chat_programs(model_config, config, mesh.devices.flat[0], target)


def chat_programs(model_config: CoPEConfig, config, device, target) -> list[Program]:
    """What `cope_jax.chat` runs on one chip of the target with the trained model: the LLM's prefill
    of a max_seq_len prompt into an empty cache (the platform's causal kernel) and one decode step,
    weights in the compute dtype (`inference.generation`)."""
    dtype = jnp.dtype(config.compute_dtype)
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(model_config.text, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    set_attention(model, config.attention, platform=target.platform)
    graph, state = nnx.split(model)
    on_chip = lambda tree: on_device(tree, device)  # noqa: E731
    length = config.max_seq_len
    cache = on_chip(jax.eval_shape(lambda: KVCache.init(model_config.text, 1, length + 1, dtype)))
    state = on_chip(state)
    embeds = on_chip(jax.ShapeDtypeStruct((1, length, model_config.text.hidden_size), dtype))
    mask = on_chip(jax.ShapeDtypeStruct((1, length), jnp.bool_))
    token = on_chip(jax.ShapeDtypeStruct((1,), jnp.int32))
    rng = on_chip(jax.eval_shape(lambda: jax.random.key(0)))
    sampling = SamplingConfig()
    weights, inputs = per_device_bytes(state), per_device_bytes((cache, embeds))
    prefill = lambda: generation.prefill.lower(graph, state, embeds, mask, cache, sampling, rng, True, True)  # noqa: E731
    decode = lambda: generation.decode_step.lower(graph, state, token, cache, sampling, rng)  # noqa: E731
    return [Program(f"chat prefill {length}", prefill, weights, 0, inputs, on_mesh=False),
            Program(f"chat decode (cache {length})", decode, weights, 0, inputs, on_mesh=False)]


def stage2_batch(rows: int, length: int, keyframes: int, p_steps: int, visual: int, size: int, where=None) -> dict:
    """The batch a stage-2 step takes (`instruct.InstructSource`), trimmed to a length bucket."""
    def s(dims, dtype):
        return jax.ShapeDtypeStruct((rows, *dims), dtype, sharding=where)

    return {"ids": s((length,), jnp.int32), "is_visual": s((length,), jnp.bool_), "is_target": s((length,), jnp.bool_),
            "keyframes": s((keyframes, size, size, 3), jnp.uint8), "mv": s((p_steps, size, size, 2), jnp.float32),
            "residual": s((p_steps, size, size, 3), jnp.int16), "token_source": s((visual,), jnp.int32)}


def _finetune_flops(graph, params, frozen, rest, micro: dict, config, model_config: CoPEConfig, length: int,
                    accumulation: int):
    """Model FLOPs of one step: the micro-batch's loss and gradients counted on their jaxpr with
    the direct attention and no remat (what the MFU convention counts), times the accumulation,
    less the masked half of causal attention (a causal kernel skips it) and the loss's recomputed
    logits (its chunks are checkpointed)."""
    def count() -> float:
        model = nnx.merge(graph, params, frozen, rest)
        set_attention(model, "xla")  # a loop-free attention whose products the count sees
        set_remat(model, "none")
        g, p, f, r = optimization.split_trainable(model, config)
        counting = config.copy_and_resolve_references()
        with counting.unlocked():
            counting.remat, counting.loss_chunk = "none", length
        _, loss_and_grad = finetune.make_functions(g, None, counting)
        micro_flops = jaxpr_flops(loss_and_grad, p, f, r, micro)
        text, rows = model_config.text, micro["ids"].shape[0]
        attention = 12.0 * rows * length**2 * text.num_attention_heads * text.head_dim * text.num_hidden_layers
        causal_saving = attention * (1 - (length + 1) / (2 * length))
        logits_recompute = 2.0 * rows * (length - 1) * text.hidden_size * text.vocab_size
        return accumulation * (micro_flops - causal_saving - logits_recompute)

    return count


# ---------------------------------------------------------------------------- stage 1


def pretrain_programs(config, mesh, target) -> list[Program]:
    pretrain.check_config(config)
    optimization.with_accumulation(config, mesh)
    compute = jnp.dtype(config.compute_dtype)
    model_config = checkpoints.stage1_delta_config(config)
    try:
        tower_config = SiglipVisionConfig(**dict(config.siglip))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.siglip: {e}") from None
    model = nnx.eval_shape(lambda: DeltaPretrainer(model_config, dtype=compute, rngs=nnx.Rngs(0)))
    tower = nnx.eval_shape(lambda: SiglipVisionModel(tower_config, dtype=compute, rngs=nnx.Rngs(0)))
    for module in (model, tower):
        set_attention(module, config.attention, platform=target.platform)
        set_scan_layers(module, config.scan_layers)
    set_remat(model, config.remat)  # before the tower joins, as pretrain.Stage does
    rules = sharding.logical_rules(config)
    graph, params, frozen, rest = (place(tree, mesh, rules) if i else tree for i, tree in enumerate(
        optimization.split_trainable(pretrain.with_target_tower(model, tower), config, frozen=pretrain.FROZEN)))
    tx, _, _ = optimization.make_optimizer(config, params)
    opt_state = optimizer_state(tx, params, mesh)
    train_step, *_ = pretrain.make_functions(graph, tx, mesh, config.grad_accum_steps)
    batch = stage1_batch(config.batch_size, model_config.image_size, sharding.batch_sharding(mesh, rules))

    def flops() -> float:
        counting = nnx.merge(graph, params, frozen, rest)
        set_attention(counting, "xla")
        set_remat(counting, "none")
        g, p, f, r = optimization.split_trainable(counting, config, frozen=pretrain.FROZEN)
        grad = pretrain.make_functions(g, tx, mesh)[-1]
        return jaxpr_flops(grad, p, f, r, stage1_batch(config.batch_size, model_config.image_size))

    return [train_program(f"{config.batch_size} pairs", train_step, (params, opt_state, frozen, rest, batch),
                          params, config.batch_size, "P steps", flops)]


def stage1_batch(rows: int, size: int, where=None) -> dict:
    """The batch a stage-1 step takes (`loaders.PairSource`)."""
    def s(dims, dtype):
        return jax.ShapeDtypeStruct((rows, *dims), dtype, sharding=where)

    return {"prev_rgb": s((size, size, 3), jnp.uint8), "rgb": s((size, size, 3), jnp.uint8),
            "mv": s((size, size, 2), jnp.float32), "residual": s((size, size, 3), jnp.int16)}


# ---------------------------------------------------------------------------- shapes and shardings


def place(tree, mesh, rules):
    """Abstract state -> ShapeDtypeStructs on the shardings training gives them."""
    shardings = sharding.state_shardings(tree, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def optimizer_state(tx, params, mesh):
    """Abstract optimizer state on the shardings `optimization.init_optimizer_state` gives it."""
    shardings = optimization.optimizer_state_shardings(tx, params, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.eval_shape(tx.init, params), shardings)


def on_device(tree, device):
    """Abstract arrays -> the same on one device (a program that runs on one chip of the target)."""
    one = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard of each)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------- compiling


def too_large(program: Program, target) -> bool:
    """No compiler needed to know: the arguments alone exceed the chip (a 7B model on one 16 GB chip)."""
    return program.parameters + program.optimizer_state + program.batch > target.usable_bytes


def compile_program(program: Program, lowered, target) -> dict:
    row = {"label": program.label, "params": program.parameters, "opt_state": program.optimizer_state,
           "batch": program.batch, "gradients": program.gradients, "items": program.items,
           "item_name": program.item_name}
    if lowered is None:  # too_large
        arguments = program.parameters + program.optimizer_state + program.batch
        row["total"], row["compile_s"] = arguments, 0.0
        row["failure"] = misfit_line(program.label, arguments, target, "its weights, optimizer state and batch alone")
        return row
    start = time.perf_counter()
    options = GPU_COMPILER_OPTIONS if target.platform == "gpu" else None
    try:
        compiled = lowered.compile(compiler_options=options)
    except Exception as e:  # noqa: BLE001 - the TPU compiler reports out of memory as an error
        row["compile_s"] = time.perf_counter() - start
        needed = out_of_memory(str(e))
        if needed is None:
            raise
        row["total"], row["failure"] = needed, misfit_line(program.label, needed, target, "the TPU compiler")
        return row
    row["compile_s"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    row["temporaries"], row["arguments"] = memory.temp_size_in_bytes, memory.argument_size_in_bytes
    row["total"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                    + memory.temp_size_in_bytes)
    hlo = compiled.as_text()
    row["kernels"] = attention_kernels(hlo)
    row["collectives"] = {op: len(re.findall(rf" {op}(?:-start)?\(", hlo)) for op in COLLECTIVES}
    if row["total"] > target.usable_bytes:
        row["failure"] = misfit_line(program.label, row["total"], target, "the compiler's plan")
    return row


def out_of_memory(message: str) -> int | None:
    """Bytes per device the TPU compiler says a program needs, from its out-of-memory error."""
    match = (re.search(r"\(([\d.]+)G\) exceeds available HBM", message)
             or re.search(r"Used ([\d.]+)G of [\d.]+G hbm", message))
    return int(float(match.group(1)) * GiB) if match else None


def misfit_line(label: str, needed: int, target, source: str) -> str:
    reserve = (f" + {target.reserve_bytes / GiB:.0f} GiB for workspaces no plan counts" if target.reserve_bytes else "")
    if "alone" in source:  # weights and optimizer state shard over fsdp: only more chips (or fewer trained weights) help
        remedy = "take more chips, or train fewer parameters (config.frozen)"
    else:
        remedy = ("fewer rows per device at a time (stage 2: config.grad_accum_steps=0 takes one; stage 1: a larger "
                  "config.grad_accum_steps), config.remat=layer and config.scan_layers=True, or more chips")
    return (f"{label} needs {needed / GiB:.1f} GiB per device{reserve}, a {target.chip.name} has "
            f"{target.chip.memory_bytes / GiB:.1f} ({source}, {target.name}): {remedy}")


# ---------------------------------------------------------------------------- what the HLO shows

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
KERNEL_NAMES = {"cudnn": "cuDNN fused attention", "splash": "Pallas splash attention"}


def attention_kernels(hlo: str) -> dict:
    """{model: {kernel: custom calls}} of the fused attention kernels in compiled HLO, attributed
    to the model (language model, vision tower, Δ-encoder) by its named scope in the op metadata;
    models the program does not run are left out."""
    found = {component: {} for component in COMPONENTS if re.search(rf'[/("]{component}[/)"]', hlo)}
    # One instruction may span lines (a Pallas kernel's attributes hold newlines): split on instruction starts.
    for line in re.split(r"\n(?=\s*(?:ROOT\s+)?%)", hlo):
        if "custom_call_target" not in line:
            continue
        if "__cudnn$fmha" in line:
            kernel = "cudnn"
        elif "tpu_custom_call" in line and "splash" in line:
            kernel = "splash"
        else:
            continue
        name = re.search(r'op_name="([^"]*)"', line)
        for component in found:  # a scope appears as "a/b", or wrapped: "jvp(b)", "transpose(jvp(b))"
            if name and re.search(rf"(^|[/(]){component}([/)]|$)", name.group(1)):
                found[component][kernel] = found[component].get(kernel, 0) + 1
    return found


# ---------------------------------------------------------------------------- FLOPs


def jaxpr_flops(fn, *args) -> float:
    """Multiply-add FLOPs (2 per MAC) of the matrix products and convolutions `fn` traces to;
    loops count their trips, conditionals their costliest branch. Elementwise work is left out,
    as MFU conventions do."""
    return _flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        elif name == "conv_general_dilated":
            rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * math.prod(out) * math.prod(rhs) / out_features
        elif name == "scan":
            total += eqn.params["length"] * _flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        total += _flops(inner)
    return total


# ---------------------------------------------------------------------------- the report


def header(config, target, mesh) -> str:
    hosts = len({d.process_index for d in mesh.devices.flat})
    mesh_text = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    lines = [f"{config.stage} ({config.variant or 'custom'}) for {target.name}: {target.chips} x {target.chip.name} "
             f"({target.chip.memory_bytes / GiB:.1f} GiB, {target.chip.bf16_flops / 1e12:.0f} TFLOP/s bf16 each, "
             f"{hosts} host{'s' * (hosts > 1)}); mesh {mesh_text}; compute {config.compute_dtype}, remat "
             f"{config.get('remat', 'none')}, scan_layers {config.scan_layers}, attention {config.attention}"]
    accumulation = optimization.with_accumulation(config, mesh).grad_accum_steps
    lines.append(f"global batch {config.batch_size} in {accumulation} micro-batch{'es' * (accumulation > 1)} = "
                 f"{config.batch_size // accumulation // sharding.batch_shards(mesh, sharding.logical_rules(config))} "
                 f"{'row(s)' if config.stage == 'finetune' else 'pairs'} per device at a time")
    if target.reserve_bytes:
        lines.append(f"fits: total + {target.reserve_bytes / GiB:.0f} GiB (cuDNN/NCCL workspaces, CUDA context) <= "
                     f"{target.chip.memory_bytes / GiB:.1f} GiB; run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 "
                     "(JAX takes 75% of a GPU by default)")
    lines += ["", "| program | parameters | optimizer state | batch (chat: KV cache + prompt) | gradients* | other temporaries | total per device "
              "| chip | fits | compile (s) |", "|---" * 10 + "|"]
    return "\n".join(lines)


def format_row(row: dict, target) -> str:
    g = lambda n: f"{n / GiB:.1f}"  # noqa: E731
    chip = g(target.chip.memory_bytes)
    if "temporaries" not in row:  # not compiled, or the TPU compiler stopped: only a total is known
        why = "arguments alone" if row["compile_s"] == 0 else "compiler: out of memory"
        return (f"| {row['label']} | {g(row['params'])} | {g(row['opt_state'])} | {g(row['batch'])} | – | – "
                f"| **{g(row['total'])}** ({why}) | {chip} | **no** | {row['compile_s']:.0f} |")
    other = row["temporaries"] - row["gradients"]
    fits = "yes" if "failure" not in row else "**no**"
    return (f"| {row['label']} | {g(row['params'])} | {g(row['opt_state'])} | {g(row['batch'])} | {g(row['gradients'])} "
            f"| {g(other)} | **{g(row['total'])}** | {chip} | {fits} | {row['compile_s']:.0f} |")


def format_kernels(rows: list[dict]) -> str:
    lines = ["", "* gradients (fp32, sharded like their parameters) are among the compiler's temporaries.", "",
             "Attention kernels in the compiled programs (custom calls, by model):"]
    for row in rows:
        if "kernels" not in row:
            continue
        parts = []
        for component, kernels in row["kernels"].items():
            shown = ", ".join(f"{KERNEL_NAMES[k]} ({n} calls)" for k, n in kernels.items()) or "XLA (no fused kernel)"
            parts.append(f"{component}: {shown}")
        collectives = ", ".join(f"{n} {op}" for op, n in row["collectives"].items() if n) or "none"
        lines.append(f"- {row['label']}: " + "; ".join(parts) + f" (collectives: {collectives})")
    return "\n".join(lines)


def format_flops(rows: list[dict], target) -> str:
    lines = ["", f"Model FLOPs per step (jaxpr count: matmuls and convolutions, causal attention halved) and the "
             f"throughput per chip that {MFU:.0%} MFU of {target.chip.bf16_flops / 1e12:.0f} TFLOP/s means:"]
    for row in rows:
        if "model_flops" not in row:
            continue
        per_item = row["model_flops"] / row["items"]
        rate = MFU * target.chip.bf16_flops / per_item
        lines.append(f"- {row['label']}: {row['model_flops'] / 1e15:.1f} PFLOP per step ({row['items']:,} "
                     f"{row['item_name']}), {per_item / 1e9:.1f} GFLOP per {row['item_name'][:-1]}: {rate:,.0f} "
                     f"{row['item_name']}/s per chip, a step in {row['model_flops'] / target.chips / (MFU * target.chip.bf16_flops):.1f} s")
    return "\n".join(lines)
