"""Conversion throughput and peak memory on a >= 1 GB checkpoint built here.

Builds a random HF Qwen2 (hidden 2048, 16 layers, vocab 32000: 840M weights, 3.1 GiB fp32 on
disk, sharded safetensors) in one process, converts it in another (`cope_jax.convert.main`, the
CLI's code path: read, convert, orbax save) and reads that process's own peak resident memory
(VmHWM, which exec resets). The target: peak ~ runtime + output + the largest tensor, not input +
output.

    .venv/bin/python bench/bench_convert.py [--dtype float32|bfloat16]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

BUILD = """
import sys, torch, transformers
config = transformers.Qwen2Config(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=4)
model = transformers.Qwen2ForCausalLM(config)
model.save_pretrained(sys.argv[1], max_shard_size="500MB")
print(max(p.numel() * 4 for p in model.parameters()))
"""

# Runs nothing (runtime only), `from_pytorch` (load), or the CLI's code (load + orbax save), then
# prints this process's peak RSS in KiB.
MEASURE = """
import sys
import jax, cope_jax.convert
jax.numpy.zeros(1).block_until_ready()
if sys.argv[1] == "load":
    cope_jax.convert.from_pytorch(sys.argv[2], sys.argv[3])
elif sys.argv[1] == "cli":
    assert cope_jax.convert.main(sys.argv[2:]) == 0
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def run_python(code: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout.split()[-1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    from common import machine

    with tempfile.TemporaryDirectory() as work:
        source = os.path.join(work, "hf")
        largest = int(run_python(BUILD, source))
        input_bytes = sum(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source) if f.endswith(".safetensors"))
        runtime_kib = int(run_python(MEASURE, "none"))
        start = time.perf_counter()
        load_kib = int(run_python(MEASURE, "load", source, args.dtype))
        load_seconds = time.perf_counter() - start
        start = time.perf_counter()
        peak_kib = int(run_python(MEASURE, "cli", "--source", source, "--output", os.path.join(work, "out"), "--dtype", args.dtype))
        seconds = time.perf_counter() - start
    output_bytes = input_bytes // (2 if args.dtype == "bfloat16" else 1)
    mib = 2**20
    print(f"machine: {machine()}")
    print(f"input {input_bytes / 2**30:.2f} GiB fp32 -> {args.dtype} output {output_bytes / mib:.0f} MiB; "
          f"largest tensor {largest / mib:.0f} MiB; runtime alone {runtime_kib / 1024:.0f} MiB")
    for phase, kib, secs in (("from_pytorch (read + convert)", load_kib, load_seconds),
                             ("CLI (read + convert + orbax save)", peak_kib, seconds)):
        extra = kib * 1024 - runtime_kib * 1024 - output_bytes
        print(f"{phase}: {secs:.1f} s, {input_bytes / mib / secs:.0f} MiB/s of input; peak RSS {kib / 1024:.0f} MiB = "
              f"runtime + output + {extra / mib:.0f} MiB ({extra / largest:.1f} x largest tensor)")


if __name__ == "__main__":
    main()
