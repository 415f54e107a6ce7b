"""Writes a tiny RANDOM LLaVA-Video checkpoint (LLaVA-NeXT `llava_qwen` layout, transformers
modules, safetensors) with a local ChatML tokenizer: a stand-in for lmms-lab/LLaVA-Video-7B-Qwen2
to try conversion and chat offline. Its answers are noise; the plumbing is real.

    .venv/bin/python tests/tiny_llava.py --output /tmp/tiny-llava          # 64 px, width 48: fits `make run`'s Δ-encoder
    .venv/bin/python -m cope_jax.convert --source /tmp/tiny-llava --delta-encoder workdir/pretrain-tiny \\
        --output /tmp/tiny-cope --gop 60 --keyframes-per-gop 1
    .venv/bin/python -m cope_jax.chat --checkpoint /tmp/tiny-cope --video clip.mp4 --question "What happens?"
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_cope import Reference, save_llava_next  # noqa: E402

from cope_jax.video.tokenizer import chatml_tokenizer  # noqa: E402


def write(output: str, image_size: int = 64, patch_size: int = 16, width: int = 48, vocab_size: int = 400) -> str:
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=3, num_attention_heads=4)
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, initializer_range=0.25, max_position_embeddings=32768)
    os.makedirs(output, exist_ok=True)
    save_llava_next(Reference(keep_layers=2, vision=vision, text=text), pathlib.Path(output), "bilinear")
    chatml_tokenizer(vocab_size).save_pretrained(output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--image-size", type=int, default=64, help="tower frame size; a multiple of 16 (default %(default)s)")
    parser.add_argument("--patch-size", type=int, default=16, help="default %(default)s")
    parser.add_argument("--width", type=int, default=48, help="tower width = the Δ-encoder's (default %(default)s)")
    args = parser.parse_args()
    print(write(args.output, args.image_size, args.patch_size, args.width))


if __name__ == "__main__":
    main()
