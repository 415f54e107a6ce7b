"""Next-frame retrieval at the step rate (paper App. H.6, Tab. H.6).

Query: frame t-1 of a video. Target: frame t. Database: every step of the same video except the
query itself. The baseline embeds the query with SigLIP alone; ours predicts step t's SigLIP
tokens from frame t-1's tokens plus the Δ of step t (Δ-encoder + reference and warped
transformers, as after pretraining). Embeddings are mean-pooled tokens, compared by cosine
similarity. Only P steps are queried (a GOP start has no Δ).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cope_jax import distributed
from cope_jax.training.loop import log
from data_pipeline import records

KS = (1, 2, 5)


def _normalise(x: np.ndarray) -> np.ndarray:
    pooled = x.mean(axis=-2) if x.ndim == 3 else x
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def ranks(queries: np.ndarray, database: np.ndarray, targets: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """0-based rank of each query's target among database rows, the excluded row removed."""
    similarity = _normalise(queries) @ _normalise(database).T
    similarity[np.arange(len(queries)), excluded] = -np.inf
    target_score = similarity[np.arange(len(queries)), targets]
    return (similarity > target_score[:, None]).sum(axis=1)


def next_frame_retrieval(videos, siglip_tokens: Callable, predict_tokens: Callable, max_videos: int) -> dict:
    """videos: sequence of record dicts (data_pipeline.records). siglip_tokens(rgb uint8 [T,H,W,3])
    -> [T,N,D]; predict_tokens(prev_tokens [P,N,D], mv [P,H,W,2], residual [P,H,W,3]) -> [P,N,D]."""
    baseline, ours = [], []
    for index in range(min(len(videos), max_videos)):
        record = videos[index]
        steps = np.flatnonzero(~record["is_gop_start"])
        steps = steps[steps >= 1]
        if len(record["rgb"]) < 3 or len(steps) == 0:
            continue  # need a database with at least one wrong answer
        tokens = np.asarray(siglip_tokens(record["rgb"]))
        predicted = np.asarray(predict_tokens(tokens[steps - 1], record["mv"][steps], record["residual"][steps]))
        baseline.append(ranks(tokens[steps - 1], tokens, steps, steps - 1))
        ours.append(ranks(predicted, tokens, steps, steps - 1))
        distributed.progress(f"retrieval over video {index}")
    if not baseline:
        return {"queries": 0}
    baseline, ours = np.concatenate(baseline), np.concatenate(ours)
    result = {"queries": int(len(ours))}
    for k in KS:
        result[f"siglip_recall@{k}"] = float(np.mean(baseline < k))
        result[f"delta_recall@{k}"] = float(np.mean(ours < k))
    return result


def format_result(result: dict) -> str:
    if not result.get("queries"):
        return "retrieval: no P-step queries (videos too short)"
    cells = "  ".join(f"R@{k} {result[f'delta_recall@{k}']:.3f} vs {result[f'siglip_recall@{k}']:.3f}" for k in KS)
    return f"next-frame retrieval over {result['queries']} queries (Δ-encoder vs SigLIP-only): {cells}"


def evaluate(stage, params) -> dict:
    """The evaluator of a stage-1 run (`pretrain.Stage`): retrieval over its own records."""
    result = next_frame_retrieval(
        records.open(stage.data_dir), lambda rgb: stage.siglip_tokens(params, stage.frozen, stage.rest, rgb),
        lambda prev, mv, residual: stage.predict(params, stage.frozen, stage.rest, prev, mv, residual),
        stage.config.eval_max_videos)
    log(format_result(result))
    return result
