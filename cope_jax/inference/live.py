"""Asking about a video while it streams.

The video prefix grows one step at a time as the stream's steps arrive (a keyframe through SigLIP,
a P step through the Δ-encoder, its tokens prefilled onto the cache). A question due (after `at`
seconds of video, typed meanwhile, or at the stream's end) forks the prefix and answers about the
video so far; the prefix goes on growing. A question therefore costs its time instruction and its
own words, never the video before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from cope_jax.inference.generation import SamplingConfig
from cope_jax.inference.prefix import Engine, VideoPrefix
from cope_jax.inference.session import VideoChat
from cope_jax.video.live import Event, LiveStream, StepAssembler
from cope_jax.video.settings import VideoInputError, VideoSettings


@dataclasses.dataclass(frozen=True)
class Question:
    text: str
    at: float | None = None  # seconds of video to wait for; None: when the stream ends


@dataclasses.dataclass
class Outcome:
    """How a live run ended: `error` is the one-line reason when the stream stalled or broke."""

    seconds: float
    answered: int
    asked: int
    error: str | None = None
    note: str = ""  # how a stream without an end of its own (UDP, a growing file) was taken as ended


# on_answer(question, chat, text pieces, lag_s): consume the pieces, then chat.last holds the stats.
AnswerCallback = Callable[[Question, VideoChat, Iterator[str], float], None]


class LiveVideoChat:
    """Questions about a stream, each answered about the video that has arrived when it is due.

        live = LiveVideoChat(model, tokenizer, settings, LiveStream("-", settings.preprocessing))
        outcome = live.run([Question("What happens?", at=6.0)], on_answer)
    """

    def __init__(self, model, tokenizer, settings: VideoSettings, stream: LiveStream, *,
                 sampling: SamplingConfig | None = None, max_context_tokens: int | None = None, seed: int = 0,
                 engine: Engine | None = None):
        settings.check()
        if settings.dense_frames:
            raise VideoInputError("--dense-frames spreads N frames over a whole video; a live stream has no end to spread them over")
        self.model, self.tokenizer, self.settings, self.stream = model, tokenizer, settings, stream
        self.sampling, self.max_context_tokens, self.seed = sampling, max_context_tokens, seed
        self.engine = engine or Engine(model)
        self.assembler = StepAssembler(settings, stream.source)
        self.prefix = VideoPrefix(self.engine, tokenizer, zero_delta=settings.delta_mode == "zero",
                                  max_tokens=max_context_tokens, source=stream.source)
        self.seconds = 0.0
        self.answered = 0

    def run(self, questions: list[Question], on_answer: AnswerCallback) -> Outcome:
        """Reads the stream to its end, asking each question when it is due (typed questions arrive
        as `question` events on the stream's queue). Questions whose time never came are asked at
        the end. A stall, a broken stream or a video beyond the context ends the run with `error`."""
        scheduled = sorted((q for q in questions if q.at is not None), key=lambda q: q.at)
        at_end = [q for q in questions if q.at is None]
        typed: list[Question] = []  # typed before any video arrived: asked at the first step
        asked, note = len(questions), ""
        try:
            for event in self.stream.events():
                if event.kind == "error":
                    return Outcome(self.seconds, self.answered, asked, f"{self.stream.source}: {event.message} "
                                                                       f"after {self.seconds:.1f}s of video")
                if event.kind == "end":
                    note = event.message
                    break
                if event.kind == "question":
                    asked += 1
                    typed.append(Question(event.message))
                self._take(event)
                while scheduled and scheduled[0].at <= self.seconds + 1e-9:
                    self._ask(scheduled.pop(0), on_answer)
                while typed and self.prefix.held:
                    self._ask(typed.pop(0), on_answer)
            for question in scheduled + typed + at_end:
                self._ask(question, on_answer)
        except VideoInputError as e:
            return Outcome(self.seconds, self.answered, asked, str(e))
        return Outcome(self.seconds, self.answered, asked, note=note)

    def _take(self, event: Event) -> None:
        if event.kind == "frames":
            self.seconds = self.prefix.seconds = event.frames / self.settings.preprocessing.fps
        elif event.kind == "step":
            chunk = self.assembler.add(event.step)
            if chunk is not None:
                self.prefix.append(chunk)

    def lag(self) -> float:
        """How far the video read is behind the stream's real time: the wall time from the first
        frame's arrival to the newest's, less the video read (a stream that stopped adds no lag)."""
        stream = self.stream
        if stream.first_frame_at is None:
            return 0.0
        return max(0.0, stream.last_frame_at - stream.first_frame_at - self.seconds)

    def _ask(self, question: Question, on_answer: AnswerCallback) -> None:
        chat = VideoChat(self.model, self.tokenizer, self.settings, sampling=self.sampling, seed=self.seed,
                         max_context_tokens=self.max_context_tokens, engine=self.engine, prefix=self.prefix.fork())
        on_answer(question, chat, chat.ask(question.text), self.lag())
        self.answered += 1
