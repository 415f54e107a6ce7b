"""The training entry point: `python -m cope_jax.main --config=configs/<stage>.py[:variant] --workdir DIR`.

    python -m cope_jax.main --config=configs/pretrain.py:tiny --workdir /tmp/cope-tiny
    python -m cope_jax.main --config=configs/pretrain.py:tiny --workdir /tmp/cope-tiny --config.total_steps=600
    python -m cope_jax.main --config=configs/pretrain.py:tiny --workdir /tmp/cope-tiny --mode=eval

The stage comes from the config (`config.stage`). Rerunning with the same --workdir resumes from
its latest committed checkpoint; SIGTERM saves and stops cleanly. Multi-host runs call
`jax.distributed.initialize()` first (see launch/).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/pretrain.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints/, tensorboard/ and demo data (resumes if present)")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (and evaluate), or only evaluate the latest checkpoint")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host; see launch/)")


def run(config, workdir: str, mode: str = "train") -> dict:
    from cope_jax.errors import ConfigError
    from cope_jax.training import finetune, pretrain

    stages = {"pretrain": (pretrain.train, pretrain.evaluate_only), "finetune": (finetune.train, finetune.evaluate_only)}
    if config.stage not in stages:
        raise ConfigError(f"config.stage {config.stage!r} is not one of {sorted(stages)}")
    train, evaluate = stages[config.stage]
    return train(config, workdir) if mode == "train" else evaluate(config, workdir)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        print("error: --config and --workdir are required (python -m cope_jax.main --helpfull)", file=sys.stderr)
        sys.exit(2)
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    from cope_jax.errors import UserError

    try:
        run(_CONFIG.value, os.path.abspath(_WORKDIR.value), _MODE.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
