"""Accelerators by name, and their devices without the hardware (docs/architecture.md §11).

`parse("v5p-16")` -> a `Target`: the chip, its memory and bf16 peak, how many devices a mesh gets.
`devices(target)` asks the accelerator's own compiler for a deviceless topology: libtpu for TPUs,
the CUDA plugin with XLA's H100 target description (`h100_sxm.txtpb`, shipped here) for GPUs, so a
CPU host can compile and plan programs for chips it does not have. Names follow Cloud TPU's
accelerator types: `v5p-N` and `v4-N` count TensorCores (two per chip, one megacore device each),
`v5litepod-N` and `v6e-N` count chips; `h100-N` and `h200-N` count GPUs, 8 per host.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

GiB = 2**30
FORMS = "v5p-N, v4-N (TensorCores, 2 per chip), v5litepod-N, v6e-N (chips), h100-N, h200-N (GPUs, 8 per host)"


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # "tpu" or "gpu"
    memory_bytes: int  # per chip: what a program may use (TPU: HBM; GPU: the card's total)
    bf16_flops: float  # dense peak per chip, FLOP/s
    topology: str = ""  # TPU: libtpu's topology prefix
    chip_config: str = "default"  # TPU: "megacore" joins a chip's two TensorCores into one device
    dims: int = 2  # TPU: torus dimensions


# Memory and peak as vendors publish them (v5p 95 GB, v5e 16 GB, v6e 32 GB, v4 32 GB; H100 SXM and
# H200 dense bf16 989 TFLOP/s). GPU memory is nvidia-smi's total (81,559 and 143,771 MiB).
CHIPS = {
    "v4": Chip("TPU v4", "tpu", 32 * GiB, 275e12, "v4", "megacore", 3),
    "v5p": Chip("TPU v5p", "tpu", 95 * GiB, 459e12, "v5", "megacore", 3),
    "v5litepod": Chip("TPU v5e", "tpu", 16 * GiB, 197e12, "v5e"),
    "v6e": Chip("TPU v6e", "tpu", 32 * GiB, 918e12, "v6e"),
    "h100": Chip("H100 80GB", "gpu", 81559 * 2**20, 989e12),
    "h200": Chip("H200 141GB", "gpu", 143771 * 2**20, 989e12),
}
GPUS_PER_HOST = 8
# GPU programs leave room for what no compiler plan counts: cuDNN and NCCL workspaces, the CUDA
# context. TPU compilers plan everything and refuse what does not fit, so nothing is held back.
GPU_WORKSPACE_BYTES = 5 * GiB


class TargetError(ValueError):
    """A target name that is not an accelerator type, or a compiler that is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    chips: int

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def reserve_bytes(self) -> int:
        return GPU_WORKSPACE_BYTES if self.platform == "gpu" else 0

    @property
    def usable_bytes(self) -> int:
        """Per device, for the program itself."""
        return self.chip.memory_bytes - self.reserve_bytes

    def torus(self) -> tuple[int, ...]:
        """TPU chip grid: from 2x2(x1), double the smallest side (the last of equals), as Cloud TPU
        slices grow (v5p-16 2x2x2, v5p-32 2x2x4, v6e-64 8x8)."""
        if self.chips == 1:
            return (1,) * self.chip.dims
        shape = [2, 2] + [1] * (self.chip.dims - 2)
        while math.prod(shape) < self.chips:
            smallest = min(shape)
            shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
        return tuple(shape)


def parse(name: str) -> Target:
    """An accelerator type name -> Target, or TargetError naming the accepted forms."""
    match = re.fullmatch(r"(v5p|v4|v5litepod|v6e|h100|h200)-(\d+)", name.strip().lower())
    if not match:
        raise TargetError(f"--target {name!r}: not an accelerator type; accepted: {FORMS}, e.g. v5p-16, v6e-64, h100-8")
    family, count = match.group(1), int(match.group(2))
    chip = CHIPS[family]
    if family in ("v5p", "v4"):
        if count < 8 or count & (count - 1):
            raise TargetError(f"--target {name}: {family}-N counts TensorCores (2 per chip); N is 8, 16, 32, ... "
                              f"(a power of two from 8)")
        return Target(name, chip, count // 2)
    if chip.platform == "tpu":
        if count != 1 and (count < 4 or count & (count - 1)):
            raise TargetError(f"--target {name}: {family}-N counts chips; N is 1, 4, 8, 16, ... (1 or a power of two from 4)")
        return Target(name, chip, count)
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise TargetError(f"--target {name}: {family}-N counts GPUs; N is 1 to {GPUS_PER_HOST} or a multiple of {GPUS_PER_HOST}")
    return Target(name, chip, count)


def compile_environment() -> None:
    """Before JAX starts a backend: this host's CPU runs the program's host side, and libtpu must not
    look for TPU VM metadata (there is none)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu locks a host's chips for one process; a deviceless compile holds none, and two may run at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax  # read its environment at import, possibly before this

    jax.config.update("jax_platforms", "cpu")


def missing_compiler(target: Target) -> str | None:
    """Why this Python cannot compile for `target` (one line), or None."""
    package = "libtpu" if target.platform == "tpu" else "jax_plugins.xla_cuda12"
    try:
        found = importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return None
    what = "the TPU compiler (libtpu)" if target.platform == "tpu" else "the CUDA compiler (jax-cuda12-plugin)"
    return (f"{what} is not installed in this Python; build the compile environment with `make compile-env` and run "
            f".venv-compile/bin/python -m cope_jax.main ... --mode=compile --target={target.name}")


def gpu_target_config(target: Target) -> str:
    """XLA's target description of the GPU (the H100 SXM spec; an H200 differs in memory and bandwidth)."""
    with open(os.path.join(os.path.dirname(__file__), "h100_sxm.txtpb")) as f:
        text = f.read()
    if target.chip is CHIPS["h200"]:
        text = re.sub(r"device_memory_size: \d+", f"device_memory_size: {CHIPS['h200'].memory_bytes}", text)
        text = re.sub(r"memory_bandwidth: \d+", "memory_bandwidth: 4800000000000", text)
        text = text.replace("H100 80GB HBM3", "H200")
    return text


def devices(target: Target) -> list:
    """`target`'s devices as the accelerator's compiler sees them, with none attached."""
    problem = missing_compiler(target)
    if problem:
        raise TargetError(problem)
    from jax.experimental import topologies

    if target.platform == "tpu":
        shape = target.torus()
        bounds = (1, 1, 1) if target.chips == 1 else (2, 2, 1)
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{target.chip.topology}:{'x'.join(map(str, shape))}",
            chip_config_name=target.chip.chip_config, chips_per_host_bounds=bounds, num_slices=1,
            wrap=(False,) * 3)
    else:
        hosts = max(1, target.chips // GPUS_PER_HOST)
        topology = topologies.get_topology_desc(platform="cuda", topology_name="",
                                                topology=f"1x{hosts}x{min(target.chips, GPUS_PER_HOST)}",
                                                target_config=gpu_target_config(target))
    found = list(topology.devices)
    if len(found) != target.chips:
        raise TargetError(f"--target {target.name}: the compiler gave {len(found)} devices, expected {target.chips}")
    return found
