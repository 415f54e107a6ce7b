"""Training: what both stages share, and the stages themselves (docs/architecture.md §5, §8).

- `loop`: the one training loop (resuming, checkpoints, SIGTERM, logging, evaluators);
- `optimization`: trainable parameters and learning rates by regex, the optimizer, its state on the
  mesh, gradient accumulation; `checks`: what a config must satisfy; `metrics`: TensorBoard files
  and throughput;
- `pretrain`: stage 1, Δ-encoder alignment (paper §3.3);
- `finetune`: stage 2, end-to-end instruction tuning; `instruct`: its data (LLaVA-Video-178K);
- `demo`: the built-in demo data of the tiny configs.
Mesh and batch sharding are `cope_jax.sharding`'s, checkpoints `cope_jax.checkpoints`'s and the
evaluators `cope_jax.evaluation`'s.
"""
