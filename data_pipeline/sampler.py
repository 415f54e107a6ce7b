"""Which steps of a record a training sample uses, and what they cost in LLM tokens.

docs/architecture.md §3 "Samples for training": within each GOP, `keyframes_per_gop` steps at even spacing
(always including the GOP's I step) are keyframes (RGB through SigLIP); the other steps are P steps
(8 Δ-tokens). Videos with more than `max_gops` GOPs keep `max_gops` of them, spread uniformly.
docs/architecture.md §4: a keyframe costs 14 x 15 = 210 tokens, a P step 2 x (4 + 1) = 10.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TOKENS_PER_KEYFRAME = 210
TOKENS_PER_P_STEP = 10


@dataclasses.dataclass(frozen=True)
class StepPlan:
    steps: np.ndarray  # int32 [S]: record step indices, in time order
    is_keyframe: np.ndarray  # bool [S]

    @property
    def num_keyframes(self) -> int:
        return int(self.is_keyframe.sum())

    @property
    def num_p_steps(self) -> int:
        return int((~self.is_keyframe).sum())

    def tokens(self, tokens_per_keyframe: int = TOKENS_PER_KEYFRAME, tokens_per_p_step: int = TOKENS_PER_P_STEP) -> int:
        return token_count(self.num_keyframes, self.num_p_steps, tokens_per_keyframe, tokens_per_p_step)


def token_count(num_keyframes: int, num_p_steps: int, tokens_per_keyframe: int = TOKENS_PER_KEYFRAME,
                tokens_per_p_step: int = TOKENS_PER_P_STEP) -> int:
    """Visual tokens the LLM reads (newlines included)."""
    return num_keyframes * tokens_per_keyframe + num_p_steps * tokens_per_p_step


def gop_starts(steps: np.ndarray, gop: int, fusion: int) -> np.ndarray:
    """Which steps start a GOP, from their indices alone: step t's first frame is t * fusion, and the
    canonical re-encode starts a GOP every `gop` frames. What training knows before reading a record."""
    return (np.asarray(steps) * fusion) % gop == 0


def step_seconds(steps: np.ndarray, fusion: int, fps: float) -> np.ndarray:
    """Seconds from the video's start of each step, as LLaVA-Video's time instruction states them
    (frame index / fps): a step is every `fusion`-th frame of the video resampled to `fps`."""
    return (np.asarray(steps, np.float64) * fusion / fps).astype(np.float32)


def keyframe_positions(steps_per_gop: int, keyframes_per_gop: int) -> np.ndarray:
    """Evenly spaced positions within a full GOP, starting at its I step: 8 steps, 4 keyframes -> 0 2 4 6."""
    if not 1 <= keyframes_per_gop <= steps_per_gop:
        raise ValueError(f"keyframes_per_gop must be in 1..{steps_per_gop} (steps per GOP), got {keyframes_per_gop}")
    return np.arange(keyframes_per_gop) * steps_per_gop // keyframes_per_gop


def sample_steps(is_gop_start: np.ndarray, steps_per_gop: int, keyframes_per_gop: int, max_gops: int = 64) -> StepPlan:
    """Plans one video. `is_gop_start` is the record's bool[T]; `steps_per_gop` is gop // fusion."""
    is_gop_start = np.asarray(is_gop_start, bool)
    if is_gop_start.size == 0 or not is_gop_start[0]:
        raise ValueError("a record's first step must start a GOP")
    if max_gops < 1:
        raise ValueError(f"max_gops must be >= 1, got {max_gops}")
    positions = keyframe_positions(steps_per_gop, keyframes_per_gop)
    starts = np.flatnonzero(is_gop_start)
    ends = np.append(starts[1:], is_gop_start.size)
    chosen = np.arange(starts.size)
    if starts.size > max_gops:  # uniform over the video, first and last GOP included
        chosen = np.unique(np.round(np.linspace(0, starts.size - 1, max_gops)).astype(int))
    steps, keyframe = [], []
    for g in chosen:
        within = np.arange(ends[g] - starts[g])
        steps.append(starts[g] + within)
        keyframe.append(np.isin(within, positions))
    return StepPlan(np.concatenate(steps).astype(np.int32), np.concatenate(keyframe))


def video_tokens(is_gop_start: np.ndarray, steps_per_gop: int, keyframes_per_gop: int, max_gops: int = 64) -> int:
    """Token budget of one video before training (e.g. from manifest/header data)."""
    return sample_steps(is_gop_start, steps_per_gop, keyframes_per_gop, max_gops).tokens()
