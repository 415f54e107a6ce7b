"""What both training stages share, and the stages themselves (docs/architecture.md §1, §5, §8).

- `core`: mesh, optimizer, orbax checkpoints, SIGTERM, throughput;
- `loop`: the one training loop; a stage supplies its model, data, loss and evaluators;
- `metrics`: TensorBoard event files without TensorFlow;
- `pretrain`: stage 1, Δ-encoder alignment (paper §3.3); `retrieval`: its next-frame evaluation;
- `finetune`: stage 2, end-to-end instruction tuning; `instruct`: its data (LLaVA-Video-178K).
"""

from cope_jax.errors import ConfigError, UserError  # noqa: F401
from cope_jax.training.core import (  # noqa: F401
    Checkpoints, StopRequest, Throughput, batch_sharding, build_mesh, check_positive, format_eta, global_batch,
    init_optimizer_state, logical_rules, make_optimizer)
