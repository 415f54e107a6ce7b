"""Peak memory and time of a long-prompt prefill: the old path against today's, on this CPU.

Qwen2-0.5B widths (hidden 896, 14 heads / 2 KV heads, head dim 64, MLP 4864, vocab 151936, tied
embeddings), 2 layers, random weights, fp32, batch 1, an unpadded prompt given as embeddings into a
KV cache with 64 free slots, as `generation.prefill` does (token choice included):

- before: the prefill until 2026-11-26: "xla" attention with a [B,1,T,S] mask over the whole cache,
  logits at every position ([T,V]: 18.5 GiB at 32k in fp32);
- after: `generation.prefill` today: `empty_cache=True` (attention over the prompt's own keys), "auto"
  attention (the chunked path on CPU beyond 1k x 1k), logits at the last position only.

Every (path, length) runs in a fresh process whose address space is capped (`--cap-gib`, with
prlimit), so an out-of-memory run fails alone. "resident" = its RSS once the model is built and the
prefill compiled; "planned" = XLA's buffer assignment for the prefill; the prefill runs only if
resident + planned fits `--budget-gib`, and then "peak" = its VmHWM during the prefill (reset
through /proc/self/clear_refs first, so neither random initialisation nor compilation counts).
A last line measures the attention alone at one length: the chunked path's causal block skipping
against the same path with every key visible (nothing to skip), and the buffers XLA plans for the
gradient of the chunked and the direct path.

    .venv/bin/python bench/bench_long_prefill.py [--lengths 2048 4096 8192 16384 32768] [--budget-gib 14]
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import machine, median_seconds  # noqa: E402

PATHS = ("before", "after")


def qwen2_config(layers: int):
    from cope_jax.models.qwen2.modeling import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


def measure_prefill(path: str, length: int, layers: int, budget_gib: float) -> dict:
    """In the child process: one compiled prefill -> compile seconds, the buffers XLA plans for it;
    then, if resident + planned fits `budget_gib`, run seconds and peak RSS."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cope_jax.models.attention import set_attention  # lazy, like jax above: only the measured child process loads them (its RSS is the figure)
    from cope_jax.models.qwen2.modeling import KVCache, Qwen2ForCausalLM  # (same reason)

    config = qwen2_config(layers)
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    set_attention(model, "xla" if path == "before" else "auto")
    graphdef, state = nnx.split(model)
    embeds = 0.02 * jax.random.normal(jax.random.key(1), (1, length, config.hidden_size))
    mask = jnp.ones((1, length), bool)
    cache = KVCache.init(config, 1, length + 64)
    options = {} if path == "before" else dict(logits="last", empty_cache=True, unpadded=True)

    def prefill(state, embeds, mask, cache):
        logits, cache = nnx.merge(graphdef, state).forward_cached(embeds, mask, cache, **options)
        return jnp.argmax(logits[:, -1], axis=-1), cache

    clock = time.perf_counter()
    compiled = jax.jit(prefill).lower(state, embeds, mask, cache).compile()
    compile_s = time.perf_counter() - clock
    memory = compiled.memory_analysis()
    planned_mib = (memory.temp_size_in_bytes + memory.output_size_in_bytes) / 2**20
    resident_mib = rss_kib("VmRSS") / 1024
    result = dict(compile_s=compile_s, resident_mib=resident_mib, planned_mib=planned_mib)
    if resident_mib + planned_mib > budget_gib * 1024:
        return result
    with open("/proc/self/clear_refs", "w") as f:  # restart VmHWM: the peak of the prefill alone
        f.write("5")
    clock = time.perf_counter()
    jax.block_until_ready(compiled(state, embeds, mask, cache))
    return dict(result, run_s=time.perf_counter() - clock, peak_mib=rss_kib("VmHWM") / 1024)


def measure_attention(length: int) -> dict:
    """Attention alone, Qwen2-0.5B heads, T = S = length, fp32: seconds of the chunked path causal
    vs with every key visible (the same work without skipping); buffers XLA plans for the gradient
    (what training would hold) of the chunked and the direct path."""
    import jax
    import jax.numpy as jnp

    from cope_jax.models.attention import causal_attention  # lazy, like jax above: only the measured child process loads them (its RSS is the figure)

    q = jax.random.normal(jax.random.key(0), (1, length, 14, 64))
    k, v = (jax.random.normal(jax.random.key(i), (1, length, 2, 64)) for i in (1, 2))
    causal, everything = jnp.arange(length), jnp.full((length,), length - 1)

    def attend(implementation):
        return lambda q, k, v, slots: causal_attention(q, k, v, query_slots=slots, implementation=implementation)

    chunked = jax.jit(attend("chunked"))
    result = {f"{name} (s)": median_seconds(lambda: chunked(q, k, v, slots).block_until_ready(), warmup=1, repeats=3)
              for name, slots in (("causal", causal), ("every key visible", everything))}
    for implementation in ("chunked", "xla"):
        gradient = jax.jit(jax.grad(lambda *a: attend(implementation)(*a).sum(), argnums=(0, 1, 2)))
        memory = gradient.lower(q, k, v, causal).compile().memory_analysis()
        result[f"{implementation} gradient buffers (MiB)"] = memory.temp_size_in_bytes / 2**20
    return result


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def run_child(args: list[str], cap_gib: float) -> dict:
    """Runs this script with `args` in a fresh, address-space-capped process -> its JSON line."""
    command = ["prlimit", f"--as={int(cap_gib * 2**30)}", sys.executable, __file__, *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["killed"])[-1]
        return dict(error=f"exit {done.returncode}: {last[:160]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prefill_cells(r: dict) -> str:
    if "error" in r:
        return f"failed: {r['error']} | | |"
    peak, run = (f"{r['peak_mib']:.0f}", f"{r['run_s']:.1f}") if "run_s" in r else ("not run (over budget)", "-")
    return f"{peak} | {r['resident_mib']:.0f} | {r['planned_mib']:.0f} | {run}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--budget-gib", type=float, default=14.0,
                        help="run a prefill only if its resident + planned memory fits this (else compile only)")
    parser.add_argument("--cap-gib", type=float, default=18.0, help="address-space cap of each measuring process")
    parser.add_argument("--attention-length", type=int, default=8192, help="T = S of the attention-only timing")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        length = int(rest[0])
        if kind == "attention":
            print(json.dumps(measure_attention(length)))
        else:
            print(json.dumps(measure_prefill(kind, length, args.layers, args.budget_gib)))
        return
    print(f"machine: {machine()}; {args.layers} layers, fp32, budget {args.budget_gib} GiB, cap {args.cap_gib} GiB")
    print("| tokens | path | peak RSS in prefill (MiB) | resident before (MiB) | XLA planned (MiB) | prefill (s) |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        for path in PATHS:
            child = ["--layers", str(args.layers), "--budget-gib", str(args.budget_gib), "--child", path, str(length)]
            print(f"| {length} | {path} | {prefill_cells(run_child(child, args.cap_gib))} |", flush=True)
    r = run_child(["--child", "attention", str(args.attention_length)], args.cap_gib)
    print(f"\nattention only, T = S = {args.attention_length}, 14 heads / 2 KV heads, head dim 64, chunked: " +
          ", ".join(f"{name} {value:.2f}" for name, value in r.items()))


if __name__ == "__main__":
    main()
