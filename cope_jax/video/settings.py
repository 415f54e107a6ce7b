"""`VideoSettings`: everything that changes what the LLM reads from a video, saved with every CoPE
checkpoint, and the one checked way to change it (`with_switches`) that every entry point uses."""

from __future__ import annotations

import dataclasses

from cope_jax.errors import UserError
from cope_jax.video.switches import DELTA_MODES, TIME_INSTRUCTIONS
from data_pipeline import codec

_PREPROCESSING_FIELDS = tuple(f.name for f in dataclasses.fields(codec.Settings))


class VideoInputError(UserError, ValueError):
    """A video, record or setting that cannot give a correct token stream; the message names it."""


@dataclasses.dataclass(frozen=True)
class VideoSettings:
    """Everything that changes what the LLM reads from a video; saved with every CoPE checkpoint."""

    # Preprocessing (docs/architecture.md §3; paper §4.1: MPEG-4, 30 fps, GOP 240, fusion 30 = 1 step/s).
    preprocessing: codec.Settings = dataclasses.field(default_factory=codec.Settings)
    # Keyframes per GOP, the rest P steps (paper §4.1, Tab. 1). 4 is what CoPE-VideoLM is
    # fine-tuned with (App. C: "4 keyframes + 4 P-frames per GOP"); 1 is the fastest (Fig. 4a).
    keyframes_per_gop: int = 4
    max_gops: int = 64  # longer videos: uniform GOP sampling (paper §4.1, "Frame Sampling")
    delta_mode: str = "cope"  # one of switches.DELTA_MODES
    dense_frames: int = 0  # > 0: the LLaVA-Video baseline, N frames uniformly, all keyframes
    time_instruction: str = "full"  # one of switches.TIME_INSTRUCTIONS (LLaVA-Video's preamble: "full")

    def __post_init__(self):
        if isinstance(self.preprocessing, dict):
            object.__setattr__(self, "preprocessing", codec.Settings(**self.preprocessing))
        if isinstance(self.time_instruction, bool):  # checkpoints and configs before the modes: on / off
            object.__setattr__(self, "time_instruction", "full" if self.time_instruction else "none")

    def problems(self) -> list[str]:
        problems = []
        try:
            self.preprocessing.check()
        except ValueError as e:
            problems.append(str(e))
        steps_per_gop = self.preprocessing.gop // max(self.preprocessing.fusion, 1)
        if not 1 <= self.keyframes_per_gop <= max(steps_per_gop, 1):
            problems.append(f"keyframes_per_gop must be in 1..{steps_per_gop} (steps per GOP = gop / fusion), "
                            f"got {self.keyframes_per_gop}")
        if self.max_gops < 1:
            problems.append(f"max_gops must be >= 1, got {self.max_gops}")
        if self.delta_mode not in DELTA_MODES:
            problems.append(f"delta_mode must be one of {', '.join(DELTA_MODES)}, got {self.delta_mode!r}")
        if self.time_instruction not in TIME_INSTRUCTIONS:
            problems.append(f"time_instruction must be one of {', '.join(TIME_INSTRUCTIONS)}, got {self.time_instruction!r}")
        if self.dense_frames < 0:
            problems.append(f"dense_frames must be >= 0, got {self.dense_frames}")
        return problems

    def check(self) -> None:
        if problems := self.problems():
            raise VideoInputError("; ".join(problems))

    def with_switches(self, *, where: str = "", error: type[Exception] = VideoInputError, **switches) -> "VideoSettings":
        """These settings with `switches` replaced (None: keep), checked. A switch may also name a
        preprocessing field (fps, gop, fusion, ...). A problem raises `error` with every problem in
        one line, after `where` (the flag or config field the values came from)."""
        given = {name: value for name, value in switches.items() if value is not None}
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(self)} - set(_PREPROCESSING_FIELDS))
        preprocessing = {name: given.pop(name) for name in list(given) if name in _PREPROCESSING_FIELDS}
        problems = [f"unknown setting {name!r}" for name in unknown]
        if not problems:
            updated = dataclasses.replace(self, **given,
                                          preprocessing=dataclasses.replace(self.preprocessing, **preprocessing))
            problems = updated.problems()
        if problems:
            raise error((f"{where}: " if where else "") + "; ".join(problems))
        return updated

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VideoSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
