"""Stage 2 at the paper's scale, on paper: per-device memory and FLOPs of the `paper` train step.

    .venv/bin/python bench/plan_finetune.py --devices 8 --mesh fsdp=8 --remat layer none
    .venv/bin/python bench/plan_finetune.py --devices 32 --mesh fsdp=32 --json-out plan32.json
    .venv/bin/python bench/plan_finetune.py --devices 64 --mesh fsdp=64 --grad-accum 2

The train step of `configs/finetune.py:paper` (LLaVA-Video-7B + Δ-encoder, bf16 compute, fp32
master weights, AdamW, gradient accumulation, remat) is lowered and compiled for a mesh of
`--devices` emulated CPU devices on abstract weights (`nnx.eval_shape`): nothing is materialised.
One representative sample shape stands for the batch (paper App. C: 4 keyframes + 4 P steps per
GOP; 8 GOPs = 32 keyframes of 210 tokens + 32 P steps of 10 tokens = 7,040 visual tokens, padded
to the `--seq-len` bucket).

Per device it reports: the exact bytes of the sharded parameters and AdamW state (from their
shardings; moments follow their parameters, scalars replicated); XLA's memory analysis of the
compiled step (temporaries = activations, gradient accumulator, gathered weights, working memory;
peak = arguments + outputs - donated + temporaries), with the bytes of weights all-gathered once
outside the micro-batch loop; and, backend-independent, the residuals JAX keeps per row for the
backward (`jax.vjp` of the micro-batch loss, weights excluded), added to the state and gradient
accumulator as a second estimate.

FLOPs: XLA's cost analysis counts a loop body once (checked here on a small scan), and the step
holds three loops (the micro-batch scan, the chunked attention, the chunked loss), so its raw count
is shown but not used. FLOPs are counted on a loop-free lowering of one micro-batch (direct
attention, one loss chunk) times the accumulation steps, plus the optimizer update; the masked
half of QKᵀ and PV (a causal kernel skips it) is taken out analytically, and for model FLOPs (the
MFU convention) so are remat's recomputation and the loss's recomputed logits. Then tokens/s per
H100 for 45% MFU = 0.45 x 989 TFLOP/s / (model FLOPs per step / (batch x sequence bucket)).

XLA:CPU flags (`--xla-cpu-flags planning`, the default): the memory-optimising scheduler and no
HLO CSE pass, because with XLA:CPU's defaults remat saves little. On a Qwen2 of width 512 with 8
vs 16 layers, fsdp over 8 devices, one 4,096-token row per device, each extra layer costs 97 MiB
with remat="layer" against 256 MiB without (CSE merges part of the recomputed forward back into
the original one; a layer's input is 4 MiB), and 19 against 195 MiB without CSE. `default` keeps
XLA's defaults for comparison. LLVM optimisation is off (`--xla_backend_optimization_level=0`):
the buffer assignment is the same (checked on a reduced model) and compiles are faster.
"""

from __future__ import annotations

import argparse
import os
import sys

CPU_FLAGS = {
    "planning": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED --xla_disable_hlo_passes=cse",
    "default": "",
}
H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 (no sparsity)
MFU = 0.45
GiB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--devices", type=int, default=8, help="emulated CPU devices (XLA_FLAGS host platform device count)")
    p.add_argument("--mesh", nargs="+", default=["fsdp=-1"],
                   help="mesh shapes to plan, e.g. fsdp=8 or data=2,fsdp=4 or fsdp=4,tensor=2 (axes data, fsdp, "
                        "tensor; one may be -1 = the remaining devices)")
    p.add_argument("--remat", nargs="+", choices=("none", "layer", "dots"), default=None,
                   help="remat policies per decoder layer to plan (default: the config's, layer)")
    p.add_argument("--seq-len", type=int, nargs="+", default=[8192], help="sequence buckets (tokens per sample)")
    p.add_argument("--keyframes", type=int, default=32, help="keyframe slots per sample (210 tokens each)")
    p.add_argument("--p-steps", type=int, default=32, help="P-step slots per sample (10 tokens each)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the config's, 128)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: the config's, 4)")
    p.add_argument("--frozen", nargs="*", default=None,
                   help="regexes of frozen parameters (default: the config's, none), e.g. '^vision_tower/'")
    p.add_argument("--hbm-gib", type=float, default=75.0,
                   help="usable memory per device for the fits column (80 GB H100: 79.6 GiB, ~95%% usable)")
    p.add_argument("--xla-cpu-flags", choices=tuple(CPU_FLAGS), default="planning", help="see above")
    p.add_argument("--no-flops", action="store_true", help="skip the loop-free FLOP count (memory only)")
    p.add_argument("--json-out", help="write every row to this JSON file")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before JAX is imported: the emulated devices and XLA:CPU's planning flags
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                     f"--xla_force_host_platform_device_count={ARGS.devices}",
                                                     "--xla_backend_optimization_level=0",
                                                     CPU_FLAGS[ARGS.xla_cpu_flags]]))

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ttft import lowered_flops  # noqa: E402
from common import machine  # noqa: E402
from configs import finetune as finetune_configs  # noqa: E402
from cope_jax import sharding  # noqa: E402
from cope_jax.models.cope.modeling import CoPEConfig, CoPEVideoLM  # noqa: E402
from cope_jax.models.attention import set_attention  # noqa: E402
from cope_jax.models.common import set_remat  # noqa: E402
from cope_jax.compile import optimizer_state, per_device_bytes  # noqa: E402
from cope_jax.training import finetune, optimization  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    """One representative sample, repeated over the global batch."""

    batch: int
    accumulation: int
    seq_len: int
    keyframes: int
    p_steps: int
    visual_tokens: int

    @property
    def micro_batch(self) -> int:
        return self.batch // self.accumulation


def paper_config(args):
    config = finetune_configs.get_config("paper")
    config.batch_size = args.batch_size or config.batch_size
    config.grad_accum_steps = args.grad_accum or config.grad_accum_steps or 4  # 4: the calibration before per-device rows
    if args.frozen is not None:
        config.frozen = list(args.frozen)
    return config


def abstract_model(model_config: CoPEConfig, config, attention: str | None = None):
    """-> graphdef, params, frozen, rest as ShapeDtypeStructs (no shardings yet)."""
    model = nnx.eval_shape(lambda: CoPEVideoLM(model_config, dtype=config.compute_dtype, param_dtype="float32",
                                               rngs=nnx.Rngs(0)))
    if attention:
        set_attention(model, attention)
    set_remat(model, config.remat)  # the tower and the Δ-encoder, as finetune.Stage does
    return optimization.split_trainable(model, config)


def place(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def batch_structs(shape: Shape, size: int, rows: int, sharding=None) -> dict:
    """The batch dict a train step takes (`instruct.InstructSource` layout), `rows` rows."""
    def s(dims, dtype):
        return jax.ShapeDtypeStruct((rows, *dims), dtype, sharding=sharding)

    return {"ids": s((shape.seq_len,), jnp.int32), "is_visual": s((shape.seq_len,), jnp.bool_),
            "is_target": s((shape.seq_len,), jnp.bool_),
            "keyframes": s((shape.keyframes, size, size, 3), jnp.uint8),
            "mv": s((shape.p_steps, size, size, 2), jnp.float32),
            "residual": s((shape.p_steps, size, size, 3), jnp.int16),
            "token_source": s((shape.visual_tokens,), jnp.int32)}


def gathered_outside_loops(hlo_text: str) -> int:
    """Bytes of all-gather results in the entry computation of a compiled step: weights gathered
    once, outside the micro-batch loop, and so alive across it (a per-device cost to know)."""
    sizes = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u8": 1, "s16": 2, "pred": 1}
    entry = hlo_text[hlo_text.index("\nENTRY "):]
    entry = entry[: entry.index("\n}\n")]
    total = 0
    for result in re.findall(r"= (\(.*?\)|\w+\[[\d,]*\]\S*) all-gather\(", entry):  # combined gathers are tuples
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
            total += sizes.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def scan_body_count() -> float:
    """How many times XLA's cost analysis counts the body of a 4-step scan (1.0: once)."""
    x = jax.ShapeDtypeStruct((64, 64), jnp.float32)

    def flops(steps):
        fn = jax.jit(lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=steps)[0])
        analysis = fn.lower(x).compile().cost_analysis()
        return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"])

    return flops(4) / flops(1)


def attention_flops(model_config: CoPEConfig, shape: Shape, rows: int, passes: int) -> float:
    """QKᵀ and PV FLOPs of the LLM's full (non-causal) attention: 4·T²·N·H per layer and row for
    one forward; `passes` forwards' worth (3 for forward + backward, 4 with a recomputed forward)."""
    text = model_config.text
    return 4.0 * passes * rows * shape.seq_len**2 * text.num_attention_heads * text.head_dim * text.num_hidden_layers


def saved_activations_per_row(model_config: CoPEConfig, config, shape: Shape, remat: str) -> int:
    """Bytes JAX keeps from the forward for the backward of one row (backend-independent): the
    residuals of `jax.vjp` of the micro-batch loss, less the references to the weights themselves.
    What the program asks a compiler to hold at the forward/backward boundary; a compiler may
    hold less (fusing an elementwise residual into its consumer recomputes it) or more (working
    memory, gathered weights)."""
    config = config.copy_and_resolve_references()
    config.remat = remat
    graph, params, frozen, rest = abstract_model(model_config, config)
    batch = batch_structs(shape, model_config.vision.image_size, 1)

    def residuals(params, frozen, rest, batch):
        def loss(p):
            model = nnx.merge(graph, p, frozen, rest)
            return finetune.loss_sums(model, batch, remat=remat, chunk=config.loss_chunk)[0]
        return jax.vjp(loss, params)[1]

    weights = Counter((x.shape, x.dtype) for x in jax.tree.leaves((params, frozen, rest)))
    total = 0
    for x in jax.tree.leaves(jax.eval_shape(residuals, params, frozen, rest, batch)):
        if weights[(x.shape, x.dtype)] > 0:  # a weight the backward reads, not an activation
            weights[(x.shape, x.dtype)] -= 1
        else:
            total += x.size * x.dtype.itemsize
    return total


def count_flops(model_config: CoPEConfig, config, shape: Shape, remat: str) -> dict:
    """Global FLOPs of one training step with `remat`, from a loop-free lowering of one
    micro-batch's forward + backward (direct attention, the whole sequence as one loss chunk)
    times the accumulation steps, plus the optimizer update.

    hardware: what runs (recomputation included) with a causal attention kernel that skips the
    future, i.e. the direct attention's count minus the masked half of QKᵀ and PV. model (only for
    remat "none"): the same without the loss's recomputed logits, the MFU convention."""
    config = config.copy_and_resolve_references()
    config.remat, config.loss_chunk = remat, shape.seq_len
    graph, params, frozen, rest = abstract_model(model_config, config, attention="xla")
    tx, _, _ = optimization.make_optimizer(config, params)
    _, loss_and_grad = finetune.make_functions(graph, tx, config)
    batch = batch_structs(shape, model_config.vision.image_size, shape.micro_batch)
    micro, has_loop = lowered_flops(lambda *a: loss_and_grad(*a), params, frozen, rest, batch)
    if has_loop:
        raise RuntimeError("the FLOP-count lowering still holds a loop, whose body XLA would count once")
    opt_state = jax.eval_shape(tx.init, params)
    update, _ = lowered_flops(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]), params, opt_state, params)
    passes = 3 if remat == "none" else 4  # forward + backward (2 forwards' worth), + a recomputed forward
    full = attention_flops(model_config, shape, shape.micro_batch, passes)
    causal_saving = full * (1 - (shape.seq_len + 1) / (2 * shape.seq_len))
    text = model_config.text
    # chunk_loss is jax.checkpoint-ed: its logits matmul (2·D·V per position) runs again in the backward.
    loss_recompute = 2.0 * shape.micro_batch * (shape.seq_len - 1) * text.hidden_size * text.vocab_size
    accumulate = sum(x.size for x in jax.tree.leaves(params))  # one add per gradient per micro-batch
    result = {"xla_micro": micro, "causal_saving_micro": causal_saving, "update": update,
              "hardware": shape.accumulation * (micro - causal_saving + accumulate) + update}
    if remat == "none":
        result["model"] = result["hardware"] - shape.accumulation * loss_recompute
    return result


def plan_one(model_config: CoPEConfig, config, shape: Shape, mesh_shape: dict, remat: str, devices) -> dict:
    """Compile the real train step for one mesh and remat on abstract, sharded inputs."""
    config = config.copy_and_resolve_references()
    config.remat = remat
    mesh = sharding.make_mesh(mesh_shape, devices)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if shape.micro_batch % rows:
        raise SystemExit(f"micro-batch {shape.micro_batch} (batch {shape.batch} / {shape.accumulation} accumulation "
                         f"steps) does not divide over data x fsdp = {rows} devices; change --grad-accum")
    rules = sharding.logical_rules(config)
    graph, params, frozen, rest = abstract_model(model_config, config)
    params, frozen, rest = (place(t, sharding.state_shardings(t, mesh, rules)) for t in (params, frozen, rest))
    tx, _, _ = optimization.make_optimizer(config, params)
    opt_state = optimizer_state(tx, params, mesh)
    batch = batch_structs(shape, model_config.vision.image_size, shape.batch, sharding.batch_sharding(mesh))
    train_step, _ = finetune.make_functions(graph, tx, config)
    start = time.perf_counter()
    lowered = train_step.lower(params, opt_state, frozen, rest, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    memory = compiled.memory_analysis()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    return {"mesh": ",".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1 device",
            "devices": mesh.size, "remat": remat, "seq_len": shape.seq_len, "keyframes": shape.keyframes,
            "p_steps": shape.p_steps, "visual_tokens": shape.visual_tokens, "batch": shape.batch,
            "grad_accum": shape.accumulation, "rows_per_device": shape.micro_batch // rows,
            "frozen": list(config.frozen),
            "params_bytes": per_device_bytes(params), "opt_state_bytes": per_device_bytes(opt_state),
            "frozen_rest_bytes": per_device_bytes((frozen, rest)), "batch_bytes": per_device_bytes(batch),
            "xla_argument_bytes": memory.argument_size_in_bytes, "xla_output_bytes": memory.output_size_in_bytes,
            "xla_alias_bytes": memory.alias_size_in_bytes, "xla_temp_bytes": memory.temp_size_in_bytes,
            "peak_bytes": peak,  # one accumulation step: no loop, nothing is gathered "outside" it
            "gathered_outside_loop_bytes": gathered_outside_loops(compiled.as_text()) if shape.accumulation > 1 else None,
            "xla_step_flops_per_device": float(analysis.get("flops", 0.0)),
            "lower_s": lower_s, "compile_s": compile_s}


def add_flops(row: dict, flops: dict, model: dict, parameters: int, shape: Shape) -> None:
    tokens = shape.batch * shape.seq_len
    per_token = model["model"] / tokens
    row.update({"tokens_per_step": tokens, "model_flops": model["model"], "hardware_flops": flops["hardware"],
                "model_flops_per_device": model["model"] / row["devices"],
                "hardware_flops_per_device": flops["hardware"] / row["devices"],
                "six_n_t": 6.0 * parameters * tokens, "model_flops_per_token": per_token,
                "tokens_per_s_per_h100_at_45_mfu": MFU * H100_BF16_DENSE / per_token,
                "step_s_at_45_mfu": model["model"] / row["devices"] / (MFU * H100_BF16_DENSE)})


def gib(n: float) -> str:
    return f"{n / GiB:,.1f}"


def table(rows: list[dict], hbm_gib: float) -> str:
    def fits(n):
        return "yes" if n <= hbm_gib * GiB else "no"

    lines = ["| mesh | L | remat | frozen | rows/device | params | opt state | batch | XLA temp | of which gathered "
             "outside the loop | **XLA:CPU peak** | fits | JAX residuals/row | **state + residuals** | fits | compile (s) |",
             "|---" * 16 + "|"]
    for r in rows:
        gathered = r["gathered_outside_loop_bytes"]
        lines.append(f"| {r['mesh']} | {r['seq_len']} | {r['remat']} | {', '.join(r['frozen']) or '–'} "
                     f"| {r['rows_per_device']} | {gib(r['params_bytes'])} | {gib(r['opt_state_bytes'])} "
                     f"| {gib(r['batch_bytes'])} | {gib(r['xla_temp_bytes'])} | {'–' if gathered is None else gib(gathered)} "
                     f"| **{gib(r['peak_bytes'])}** | {fits(r['peak_bytes'])} | {gib(r['activations_per_row_bytes'])} "
                     f"| **{gib(r['residual_estimate_bytes'])}** | {fits(r['residual_estimate_bytes'])} | {r['compile_s']:.0f} |")
    flops = [r for r in rows if "model_flops" in r]
    if flops:
        lines += ["", "| mesh | L | remat | frozen | XLA step FLOPs/device (raw) | hardware FLOPs/device | model FLOPs/device "
                  "| 6NT/device | model FLOPs/token | tokens/s per H100 at 45% MFU | step at 45% MFU (s) |",
                  "|---" * 11 + "|"]
        for r in flops:
            d = r["devices"]
            lines.append(f"| {r['mesh']} | {r['seq_len']} | {r['remat']} | {', '.join(r['frozen']) or '–'} "
                         f"| {r['xla_step_flops_per_device'] / 1e15:.2f} P | {r['hardware_flops_per_device'] / 1e15:.2f} P "
                         f"| {r['model_flops_per_device'] / 1e15:.2f} P | {r['six_n_t'] / d / 1e15:.2f} P "
                         f"| {r['model_flops_per_token'] / 1e9:.1f} G | {r['tokens_per_s_per_h100_at_45_mfu']:,.0f} "
                         f"| {r['step_s_at_45_mfu']:.1f} |")
    return "\n".join(lines)


def parse_mesh(spec: str) -> dict:
    shape = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in spec.split(","):
        axis, _, size = part.partition("=")
        if axis not in shape or not size.lstrip("-").isdigit():
            raise SystemExit(f"--mesh {spec!r}: expected axis=size pairs over data, fsdp, tensor (e.g. fsdp=8)")
        shape[axis] = int(size)
    return shape


def main(args) -> list[dict]:
    config = paper_config(args)
    model_config = CoPEConfig.from_dict(config.model.to_dict())
    if config.batch_size % config.grad_accum_steps:
        raise SystemExit(f"batch {config.batch_size} is not divisible by {config.grad_accum_steps} accumulation steps")
    remats = args.remat or [config.remat]
    meshes = [parse_mesh(m) for m in args.mesh]
    per_sample = args.keyframes * model_config.tokens_per_keyframe + args.p_steps * model_config.tokens_per_p_step
    print(f"machine: {machine()}; {jax.device_count()} emulated devices; XLA_FLAGS={os.environ['XLA_FLAGS']}")
    print(f"paper config: batch {config.batch_size}, {config.grad_accum_steps} accumulation steps, "
          f"{args.keyframes} keyframes + {args.p_steps} P steps per sample = {per_sample} visual tokens, "
          f"frozen {list(config.frozen)}")
    print(f"XLA's cost analysis counts the body of a 4-step scan {scan_body_count():.2f} time(s)")
    rows, flops_cache, activations_cache = [], {}, {}
    for seq_len in args.seq_len:
        if per_sample >= seq_len:
            raise SystemExit(f"{per_sample} visual tokens do not fit a {seq_len}-token sequence")
        shape = Shape(config.batch_size, config.grad_accum_steps, seq_len, args.keyframes, args.p_steps, per_sample)
        for mesh_shape in meshes:
            for remat in remats:
                label = f"L={seq_len} mesh {mesh_shape} remat {remat}"
                print(f"[{time.strftime('%H:%M:%S')}] compiling {label} ...", file=sys.stderr, flush=True)
                row = plan_one(model_config, config, shape, mesh_shape, remat, jax.devices())
                print(f"[{time.strftime('%H:%M:%S')}]   lower {row['lower_s']:.0f} s, compile {row['compile_s']:.0f} s, "
                      f"peak {gib(row['peak_bytes'])} GiB per device", file=sys.stderr, flush=True)
                if (seq_len, remat) not in activations_cache:
                    activations_cache[(seq_len, remat)] = saved_activations_per_row(model_config, config, shape, remat)
                row["activations_per_row_bytes"] = activations_cache[(seq_len, remat)]
                # State + gradient accumulator (fp32, sharded as the parameters) + batch + saved activations
                # (whole rows: a tensor axis, which splits some of them, is not credited).
                row["residual_estimate_bytes"] = (2 * row["params_bytes"] + row["opt_state_bytes"] + row["frozen_rest_bytes"]
                                      + row["batch_bytes"] + row["rows_per_device"] * row["activations_per_row_bytes"])
                if not args.no_flops:
                    for key in {(seq_len, "none"), (seq_len, remat)}:
                        if key not in flops_cache:
                            start = time.perf_counter()
                            flops_cache[key] = count_flops(model_config, config, shape, key[1])
                            print(f"[{time.strftime('%H:%M:%S')}]   FLOP count L={key[0]} remat {key[1]}: "
                                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
                    parameters = sum(x.size for x in jax.tree.leaves(abstract_model(model_config, config)[1:3]))
                    add_flops(row, flops_cache[(seq_len, remat)], flops_cache[(seq_len, "none")], parameters, shape)
                rows.append(row)
    print(table(rows, args.hbm_gib))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine(), "xla_flags": os.environ["XLA_FLAGS"], "rows": rows,
                       "flops": {f"{k[0]}/{k[1]}": v for k, v in flops_cache.items()}}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(ARGS)
