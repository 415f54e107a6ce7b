"""Evaluations, one signature for all: `evaluator(stage, params) -> {name: scalar}` (big_vision's way).

A training config names its evaluators (`config.evaluators`); the loop runs them every
`config.eval_every_steps` steps (TensorBoard `eval/<name>/...`) and once at the end, after the
export, writing each final result to <workdir>/<name>.json.

- `retrieval`: next-frame retrieval of a stage-1 run (paper App. H.6);
- `demo_accuracy`: held-out multiple-choice accuracy of a stage-2 run on its demo questions, with
  Δ-tokens, zeroed Δ-tokens and keyframes only (App. H.3, H.4), scored as `cope_jax.evaluate` scores
  (`questions`).
"""

from __future__ import annotations

from collections.abc import Callable

from cope_jax.errors import ConfigError
from cope_jax.evaluation import questions, retrieval

EVALUATORS: dict[str, Callable] = {"retrieval": retrieval.evaluate, "demo_accuracy": questions.demo_accuracy}


def for_config(config) -> dict[str, Callable]:
    """config.evaluators (names) -> {name: evaluator}; an unknown name is a ConfigError."""
    unknown = [name for name in config.evaluators if name not in EVALUATORS]
    if unknown:
        raise ConfigError(f"config.evaluators: unknown {', '.join(map(repr, unknown))} (known: {', '.join(EVALUATORS)})")
    return {name: EVALUATORS[name] for name in config.evaluators}
