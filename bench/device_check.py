"""What only a real GPU can show, in one short run (at most ~8 minutes on one H100):

    python bench/device_check.py --out /tmp/device_check          # on a machine with an NVIDIA GPU

1. cuDNN's fused attention against the chunked (flash-style) path, in bf16, forward and gradients:
   the LLM's causal GQA attention (28 heads over 4 KV heads, head dim 128, 4,096 tokens) and the
   encoders' bidirectional attention (SigLIP: 16 heads of 72 over 729 patches).
2. A few stage-2 train steps of a reduced CoPE-VideoLM in bf16 on the GPU (attention "auto", i.e.
   cuDNN) against the same steps on this machine's CPU (chunked attention): the losses agree
   within bf16 tolerance.
3. Time to first token at the real 7B shapes with random bf16 weights: bench/bench_ttft.py
   --part cpu --device gpu (dense 64 keyframes vs CoPE 1/2/4 keyframes per GOP).

Writes check.json (every figure) and prints one PASS/FAIL line per check; exit 1 if one fails.
On a host without a GPU it refuses (nothing to check).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flax import nnx  # noqa: E402

from configs import finetune as finetune_configs  # noqa: E402
from cope_jax.models.attention import causal_attention, encoder_attention, set_attention  # noqa: E402
from cope_jax.models.cope.modeling import CoPEConfig, CoPEVideoLM  # noqa: E402
from cope_jax.training import finetune, optimization  # noqa: E402

BF16_TOLERANCE = 2e-2  # relative, on values of order 1: bf16 carries 8 bits of mantissa


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def attention_check(gpu) -> dict:
    """cuDNN vs chunked in bf16 on the GPU, values and gradients of a random projection."""
    results = {}
    r = np.random.default_rng(0)
    cases = {"llm_causal": ((1, 4096, 28, 128), (1, 4096, 4, 128), True),
             "siglip_bidirectional": ((8, 729, 16, 72), (8, 729, 16, 72), False)}
    for name, (q_shape, kv_shape, causal) in cases.items():
        q, k, v = (jax.device_put(jnp.asarray(r.normal(size=s), jnp.bfloat16), gpu) for s in (q_shape, kv_shape, kv_shape))
        probe = jax.device_put(jnp.asarray(r.normal(size=q_shape), jnp.bfloat16), gpu)

        def run(implementation):
            if causal:
                f = lambda q, k, v: causal_attention(q, k, v, implementation=implementation)  # noqa: E731
            else:
                f = lambda q, k, v: encoder_attention(q, k, v, implementation=implementation)  # noqa: E731
            loss = lambda q, k, v: (f(q, k, v).astype(jnp.float32) * probe).sum()  # noqa: E731
            return jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)

        reference = "chunked" if causal else "xla"
        (out_c, grads_c), (out_r, grads_r) = run("cudnn"), run(reference)
        errors = [relative_error(out_c, out_r)] + [relative_error(a, b) for a, b in zip(grads_c, grads_r)]
        results[name] = {"against": reference, "out": errors[0], "dq": errors[1], "dk": errors[2], "dv": errors[3],
                         "pass": max(errors) < BF16_TOLERANCE}
    return results


def train_steps_check(gpu, steps: int = 3) -> dict:
    """The same stage-2 steps (reduced model, bf16, fixed batch) on the GPU and on the CPU."""
    model_config = CoPEConfig.tiny()
    config = finetune_configs.get_config("tiny")
    with config.unlocked():
        config.compute_dtype, config.learning_rate, config.frozen = "bfloat16", 1e-3, []
    r = np.random.default_rng(0)
    size, rows, length, keyframes, p_steps = model_config.vision.image_size, 4, 256, 2, 3
    visual = keyframes * model_config.tokens_per_keyframe + p_steps * model_config.tokens_per_p_step
    batch = {"ids": r.integers(0, 200, (rows, length)).astype(np.int32),
             "is_visual": np.zeros((rows, length), bool), "is_target": np.ones((rows, length), bool),
             "keyframes": r.integers(0, 255, (rows, keyframes, size, size, 3)).astype(np.uint8),
             "mv": r.normal(size=(rows, p_steps, size, size, 2)).astype(np.float32),
             "residual": r.integers(-20, 20, (rows, p_steps, size, size, 3)).astype(np.int16),
             "token_source": np.tile(np.arange(visual), (rows, 1)).astype(np.int32)}
    batch["is_visual"][:, 4:4 + visual] = True

    def losses(device, implementation):
        with jax.default_device(device):
            model = CoPEVideoLM(model_config, dtype="bfloat16", param_dtype="float32", rngs=nnx.Rngs(0))
            set_attention(model, implementation)
            graph, params, frozen, rest = optimization.split_trainable(model, config)
            tx, _, _ = optimization.make_optimizer(config, params)
            opt_state = tx.init(params)
            step, _ = finetune.make_functions(graph, tx, config)
            on_device = jax.device_put(batch, device)
            out = []
            for _ in range(steps):
                params, opt_state, metrics = step(params, opt_state, frozen, rest, on_device)
                out.append(float(metrics["loss"]))
        return out

    gpu_losses, cpu_losses = losses(gpu, "auto"), losses(jax.devices("cpu")[0], "chunked")
    error = max(abs(a - b) / abs(b) for a, b in zip(gpu_losses, cpu_losses))
    return {"gpu": gpu_losses, "cpu": cpu_losses, "max_relative_difference": error, "pass": error < BF16_TOLERANCE}


def ttft_check(out_dir: str) -> dict:
    path = os.path.join(out_dir, "ttft.json")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_ttft.py"), "--part", "cpu", "--device",
                             "gpu", "--repeats", "3", "--json", path], capture_output=True, text=True, timeout=360)
    figures = json.load(open(path)) if os.path.exists(path) else None
    return {"exit": result.returncode, "seconds": time.perf_counter() - start, "figures": figures,
            "output_tail": result.stdout[-4000:] + result.stderr[-2000:], "pass": result.returncode == 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="device_check", help="folder for check.json and ttft.json")
    args = parser.parse_args()
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        print("error: no GPU here (jax sees " + ", ".join(sorted({d.platform for d in jax.devices()})) + "); "
              "this checks what only a GPU can show", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    report = {"device": gpus[0].device_kind, "jax": jax.__version__}
    for name, check in (("attention", lambda: attention_check(gpus[0])), ("train_steps", lambda: train_steps_check(gpus[0])),
                        ("ttft", lambda: ttft_check(args.out))):
        start = time.perf_counter()
        try:
            report[name] = check()
        except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
            report[name] = {"pass": False, "error": f"{type(e).__name__}: {e}"}
        passed = report[name].get("pass") if "pass" in report[name] else all(v["pass"] for v in report[name].values())
        report[name]["seconds"] = time.perf_counter() - start
        print(f"{'PASS' if passed else 'FAIL'} {name} ({report[name]['seconds']:.0f} s)", flush=True)
        report[name]["passed"] = bool(passed)
    with open(os.path.join(args.out, "check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    return 0 if all(report[name]["passed"] for name in ("attention", "train_steps", "ttft")) else 1


if __name__ == "__main__":
    sys.exit(main())
