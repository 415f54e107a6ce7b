"""What a training config must satisfy, checked before anything is built or written: every problem
at once, in one line (`ConfigError`)."""

from __future__ import annotations

from collections.abc import Sequence

from cope_jax.errors import ConfigError
from cope_jax.models.attention import IMPLEMENTATIONS
from cope_jax.models.common import REMAT_POLICIES
from cope_jax.training.optimization import regex_problems

# Fields both stages' configs have that must be > 0.
POSITIVE = ("total_steps", "batch_size", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "learning_rate")


def problems(config, positive: Sequence[str] = POSITIVE) -> list[str]:
    """The problems of the fields both stages share (and `positive`, which must be > 0)."""
    found = []
    for field in positive:
        value = config[field]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            found.append(f"config.{field} must be > 0, got {value!r}")
    if not isinstance(config.eval_every_steps, int) or config.eval_every_steps < 0:
        found.append(f"config.eval_every_steps must be >= 0, got {config.eval_every_steps!r}")
    if config.compute_dtype not in ("float32", "bfloat16"):
        found.append(f"config.compute_dtype must be float32 or bfloat16, got {config.compute_dtype!r}")
    if config.attention not in IMPLEMENTATIONS:
        found.append(f"config.attention must be one of {', '.join(IMPLEMENTATIONS)}, got {config.attention!r}")
    if config.remat not in REMAT_POLICIES:
        found.append(f"config.remat must be one of {', '.join(REMAT_POLICIES)}, got {config.remat!r}")
    if "warmup_steps" in config and not found and config.warmup_steps >= config.total_steps:  # stage 1's; stage 2 has a ratio
        found.append(f"config.warmup_steps ({config.warmup_steps}) must be < config.total_steps ({config.total_steps})")
    return found + regex_problems(config)


def check(found: list[str]) -> None:
    if found:
        raise ConfigError("; ".join(found))
