"""Evaluations, one signature for all: `evaluator(stage, params) -> {name: scalar}` (big_vision's way).

A training config names its evaluators (`config.evaluators`); the loop runs them every
`config.eval_every_steps` steps (TensorBoard `eval/<scalar>`) and once at the end, after the
export, writing each final result to <workdir>/<name>.json. Each evaluator belongs to one stage.

- `retrieval`: next-frame retrieval of a stage-1 run (paper App. H.6);
- `demo_accuracy`: held-out multiple-choice accuracy of a stage-2 run on its demo questions, with
  Δ-tokens, zeroed Δ-tokens and keyframes only (App. H.3, H.4), scored as `cope_jax.evaluate` scores
  (`questions`).
"""

from __future__ import annotations

from collections.abc import Callable

from cope_jax.errors import ConfigError
from cope_jax.evaluation import questions, retrieval

# name -> (the stage it evaluates, the evaluator)
EVALUATORS: dict[str, tuple[str, Callable]] = {"retrieval": ("pretrain", retrieval.evaluate),
                                               "demo_accuracy": ("finetune", questions.demo_accuracy)}


def for_config(config) -> dict[str, Callable]:
    """config.evaluators (names) -> {name: evaluator}; a name that is unknown or belongs to the
    other stage is a ConfigError."""
    fitting = [name for name, (stage, _) in EVALUATORS.items() if stage == config.stage]
    wrong = [name for name in config.evaluators if name not in fitting]
    if wrong:
        raise ConfigError(f"config.evaluators: {', '.join(map(repr, wrong))} cannot evaluate a {config.stage} run "
                          f"(it can take: {', '.join(fitting)})")
    return {name: EVALUATORS[name][1] for name in config.evaluators}
