"""Forward latency: our JAX Qwen2 and SigLIP against transformers' PyTorch, same CPU, same weights.

Shapes are reduced but not tiny: Qwen2 with Qwen2-0.5B widths (hidden 896, 14 heads, 2 KV heads,
MLP 4864) and 8 layers on a 1024-token prompt; SigLIP so400m widths (1152, 16 heads, MLP 4304)
with 8 layers on one 384x384 image (729 patches). fp32 on both sides.

    .venv/bin/python bench/bench_forward.py
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import machine, median_seconds  # noqa: E402

from cope_jax.convert import from_pytorch  # noqa: E402


def bench_qwen2():
    config = transformers.Qwen2Config(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=8,
                                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = from_pytorch(d)
    ids = np.random.randint(0, 32000, (1, 1024))
    forward = jax.jit(lambda m, x: m(x))
    jax_s = median_seconds(lambda: forward(ours, jnp.asarray(ids)).block_until_ready())
    with torch.no_grad():
        torch_s = median_seconds(lambda: hf(torch.tensor(ids)).logits)
    return "Qwen2 8L h896, 1024 tokens", jax_s, torch_s


def bench_siglip():
    config = transformers.SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                                             num_hidden_layers=8, num_attention_heads=16)
    hf = transformers.SiglipVisionModel(config).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = from_pytorch(d)
    pixels = np.random.uniform(-1, 1, (1, 384, 384, 3)).astype(np.float32)
    forward = jax.jit(lambda m, x: m(x))
    jax_s = median_seconds(lambda: forward(ours, jnp.asarray(pixels)).block_until_ready())
    with torch.no_grad():
        torch_s = median_seconds(lambda: hf(pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).last_hidden_state)
    return "SigLIP so400m-width 8L, 1x384px", jax_s, torch_s


def main():
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    print(f"machine: {machine()}, torch {torch.__version__} ({threads} threads)")
    print("| model | JAX (ms) | PyTorch (ms) | PyTorch / JAX |\n|---|---|---|---|")
    for bench in (bench_qwen2, bench_siglip):
        name, jax_s, torch_s = bench()
        print(f"| {name} | {jax_s * 1e3:.0f} | {torch_s * 1e3:.0f} | {torch_s / jax_s:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
