"""Stage-1 pretraining speed at tiny scale, and what one P step costs against one keyframe.

    .venv/bin/python bench/bench_pretrain.py

1. The tiny config's jitted train step on this CPU (demo data, batch 8, one device): median step
   time and examples/s.
2. At the real sizes (random weights): the Δ-encoder on one P step (mv + residual, 384 px) against
   the 26-layer SigLIP tower on one keyframe, in FLOPs from XLA's cost analysis and in CPU time.
   This ratio is what lets P steps replace keyframes cheaply (the paper's time-to-first-token).
"""

import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, median_seconds  # noqa: E402
from configs import pretrain as configs  # noqa: E402
from cope_jax import sharding  # noqa: E402
from cope_jax.training import pretrain  # noqa: E402
from cope_jax.models.delta_encoder.modeling import DeltaEncoder, DeltaEncoderConfig, parameter_count  # noqa: E402
from cope_jax.models.siglip.modeling import SiglipVisionConfig, SiglipVisionModel  # noqa: E402


def tiny_step() -> tuple[float, int]:
    config = configs.get_config("tiny")
    config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    with tempfile.TemporaryDirectory() as work:
        stage = pretrain.Stage(config, work)
        local = next(iter(stage.loader))
        batch = sharding.global_batch({k: local[k] for k in ("prev_rgb", "rgb", "mv", "residual")}, stage.mesh)
        state = {"params": stage.params, "opt": stage.tx.init(stage.params)}

        def step():
            state["params"], state["opt"], m = stage.train_step(state["params"], state["opt"], stage.frozen, stage.rest, batch)
            jax.block_until_ready(m["loss"])

        return median_seconds(step, warmup=3, repeats=20), config.batch_size


def cost(fn, *args) -> tuple[float, float]:
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    seconds = median_seconds(lambda: jax.block_until_ready(compiled(*args)), warmup=1, repeats=3)
    return float(analysis["flops"]), seconds


def main():
    print(f"machine: {machine()}")
    seconds, batch = tiny_step()
    print(f"tiny pretraining step (batch {batch}, 1 CPU device): {seconds * 1e3:.1f} ms, {batch / seconds:.0f} examples/s")

    delta = DeltaEncoder(DeltaEncoderConfig.paper(), rngs=nnx.Rngs(0))
    graph, state = nnx.split(delta)
    mv = jnp.zeros((1, 384, 384, 2), jnp.float32) + jnp.linspace(-20, 20, 384)[None, :, None, None]
    residual = jnp.asarray(np.random.default_rng(0).integers(-30, 30, (1, 384, 384, 3)), jnp.int16)
    delta_flops, delta_seconds = cost(lambda s, m, r: nnx.merge(graph, s)(m, r), state, mv, residual)
    print(f"Δ-encoder (paper sizes, {parameter_count(delta) / 1e6:.1f}M parameters), one P step: "
          f"{delta_flops / 1e9:.2f} GFLOPs, {delta_seconds * 1e3:.0f} ms")
    del delta, state

    tower = SiglipVisionModel(SiglipVisionConfig.llava_video_tower(), rngs=nnx.Rngs(0))
    graph, state = nnx.split(tower)
    pixels = jnp.zeros((1, 384, 384, 3), jnp.float32)
    siglip_flops, siglip_seconds = cost(lambda s, x: nnx.merge(graph, s)(x), state, pixels)
    print(f"SigLIP tower (26 layers, {parameter_count(tower) / 1e6:.1f}M parameters), one keyframe: "
          f"{siglip_flops / 1e9:.2f} GFLOPs, {siglip_seconds * 1e3:.0f} ms")
    print(f"P step / keyframe: {delta_flops / siglip_flops:.3f} of the FLOPs, {delta_seconds / siglip_seconds:.3f} of the CPU time")


if __name__ == "__main__":
    main()
