"""Asking about a video: one conversation over one KV cache (paper App. I: later turns reuse it).

The video becomes a `VideoPrefix` (system turn, user header, visual stream) prefilled one GOP at a
time; the first question appends the time instruction and its own words to it; later turns prefill
only their own tokens after the cached conversation. Answers stream token by token. Chat, live
streams, evaluation, the server and the TTFT benchmark all run this code, so what is measured is
what users run.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from cope_jax.inference.generation import SamplingConfig, decode_step, prefill
from cope_jax.inference.prefix import CACHE_BLOCK, Engine, VideoPrefix, grow_cache
from cope_jax.video import prompt as prompts
from cope_jax.video.settings import VideoInputError, VideoSettings
from cope_jax.video.stream import Video, plan_chunks, plan_video, round_up
from cope_jax.models.cope.modeling import CoPEVideoLM
from cope_jax.models.qwen2.modeling import KVCache

# Room a question usually needs beyond the video (time instruction and words): a file's prefix is
# allocated with it, so most questions prefill without growing the cache.
QUESTION_ROOM = 512


@dataclasses.dataclass
class TurnStats:
    """One answer. `prompt_tokens` counts everything this turn fed the LLM (visual tokens included);
    `ttft_s` runs from the question to the first token (reading and encoding the video included on
    the first turn), `e2el_s` to the last."""

    visual_tokens: int
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    e2el_s: float
    keyframes: int
    p_steps: int
    timings: dict = dataclasses.field(default_factory=dict)  # first turn: primitives/vision/delta/prefill seconds
    answer_ids: list = dataclasses.field(default_factory=list)  # generated ids, stop token excluded
    video_seconds: float = 0.0  # the video's duration the answer covers


@dataclasses.dataclass
class _Turn:
    """A turn ready to prefill: its embeddings, the cache to prefill into, its ids."""

    embeds: jax.Array  # [1,T,D]
    cache: KVCache
    ids: list
    is_visual: list
    stats: TurnStats


def broadcast_cache(cache: KVCache, batch: int) -> KVCache:
    """A one-row cache repeated into `batch` rows (questions that share a prefix)."""
    rows = lambda x: jnp.repeat(x, batch, axis=0)  # noqa: E731
    return KVCache(keys=[rows(k) for k in cache.keys], values=[rows(v) for v in cache.values],
                   key_valid=rows(cache.key_valid), next_position=rows(cache.next_position), end=cache.end)


def _starts_with(tokenized: prompts.TokenizedPrompt, prefix: VideoPrefix) -> bool:
    n = len(prefix)
    return tokenized.ids[:n].tolist() == prefix.ids and tokenized.is_visual[:n].tolist() == prefix.is_visual


# ---------------------------------------------------------------------------- the conversation


class VideoChat:
    """A multi-turn conversation about one video.

        chat = VideoChat(model, tokenizer, settings, video=lambda: video_from_file(path, settings.preprocessing))
        for text in chat.ask("What happens?"):
            print(text, end="")
        chat.last  # TurnStats

    `prefix=` starts from a video prefix built elsewhere (a live stream, the server's cache) instead
    of reading `video`. `max_context_tokens` bounds the KV cache: the oldest GOPs leave it.
    """

    system = prompts.SYSTEM_PROMPT

    def __init__(self, model: CoPEVideoLM, tokenizer, settings: VideoSettings, video: Callable[[], Video] | None = None,
                 sampling: SamplingConfig | None = None, seed: int = 0, stop_at_eos: bool = True,
                 max_context_tokens: int | None = None, engine: Engine | None = None, prefix: VideoPrefix | None = None):
        """`stop_at_eos=False` always generates `sampling.max_new_tokens` (latency benchmarks)."""
        settings.check()
        if video is None and prefix is None:
            raise ValueError("VideoChat needs a video or a prefix")
        self.model, self.tokenizer, self.settings, self.load_video = model, tokenizer, settings, video
        self.max_context_tokens = max_context_tokens
        self.stop_ids = prompts.stop_token_ids(tokenizer) if stop_at_eos else ()
        self.sampling = sampling or SamplingConfig(max_new_tokens=256)
        self.sampling = dataclasses.replace(self.sampling, eos_token_id=self.stop_ids)
        self.engine = engine or Engine(model)
        self.lm_graphdef, self.lm_state = self.engine.lm_graphdef, self.engine.lm_state
        self.rng = jax.random.key(seed)
        self.cache: KVCache | None = None
        self.ids: list[int] = []  # every token in the cache, in order (0 at visual slots)
        self.is_visual: list[bool] = []
        self.pending: int | None = None  # the last generated token, not yet in the cache
        self.turns: list[TurnStats] = []
        self.plan = None  # the file's step plan, once read
        self.prefix: VideoPrefix | None = None  # this conversation's (a question may evict from its copy)
        # What any first question about the video starts from: the video prefix, with its time
        # instruction after it when the video is finished (`prefill_video`); the server keeps it.
        self.video_prefix: VideoPrefix | None = prefix
        if prefix is not None:
            self._adopt(prefix)

    @property
    def last(self) -> TurnStats:
        return self.turns[-1]

    # -- one video, many questions

    def prefill_video(self) -> TurnStats:
        """Reads the video and prefills the prefix every first question shares (system turn, user
        header, visual stream) one GOP at a time. Then `fork()` per question: each answers from
        this cache, prefilling only its own words (evaluation of many questions per video).
        Returns the prefix's stats (visual tokens; primitives/vision/delta/prefill timings)."""
        if self.cache is not None:
            raise RuntimeError("prefill_video() starts a conversation; this one has already begun")
        clock = time.perf_counter()
        video = self.load_video()
        if video.size != self.model.config.vision.image_size:
            raise VideoInputError(f"{video.source}: frames are {video.size} px, the model's tower takes "
                                  f"{self.model.config.vision.image_size} px (preprocess with --size "
                                  f"{self.model.config.vision.image_size})")
        self.plan = plan = plan_video(video, self.settings)
        cfg = self.model.config
        visual_tokens = plan.tokens(cfg.tokens_per_keyframe, cfg.tokens_per_p_step)
        prefix = VideoPrefix(self.engine, self.tokenizer, system=self.system, zero_delta=self.settings.delta_mode == "zero",
                             max_tokens=self.max_context_tokens, source=video.source, seconds=video.duration,
                             capacity=visual_tokens + QUESTION_ROOM + self.sampling.max_new_tokens)
        prefix.check_video_fits(visual_tokens)
        prefix.timings["primitives_s"] += time.perf_counter() - clock
        chunks = plan_chunks(video, plan)
        while True:
            clock = time.perf_counter()
            chunk = next(chunks, None)
            prefix.timings["primitives_s"] += time.perf_counter() - clock
            if chunk is None:
                break
            prefix.append(chunk)
        tail = prompts.tokenize(self.tokenizer, prompts.video_tail_pieces(self._preamble(prefix))).ids.tolist()
        ready = prefix.with_tail(tail) or prefix  # the video is finished: its time instruction is known
        self._adopt(ready)
        self.video_prefix = ready
        return self._prefix_stats(ttft_s=sum(ready.timings.values()))

    def _adopt(self, prefix: VideoPrefix) -> None:
        self.prefix = prefix
        self.cache, self.ids, self.is_visual = prefix.cache, list(prefix.ids), list(prefix.is_visual)

    def _prefix_stats(self, **fields) -> TurnStats:
        prefix = self.prefix
        stats = TurnStats(visual_tokens=prefix.visual_tokens, prompt_tokens=len(prefix), generated_tokens=0,
                          ttft_s=0.0, e2el_s=0.0, keyframes=prefix.keyframes, p_steps=prefix.p_steps,
                          timings=dict(prefix.timings), video_seconds=prefix.seconds)
        return dataclasses.replace(stats, **fields)

    def fork(self) -> "VideoChat":
        """A conversation that continues independently from this one's current state (the cache
        arrays are immutable, so nothing is copied)."""
        other = copy.copy(self)
        other.ids, other.is_visual, other.turns = list(self.ids), list(self.is_visual), list(self.turns)
        if self.prefix is not None:
            other.prefix = self.prefix.fork()
        return other

    def ask_many(self, questions: list[str]) -> list[tuple[str, TurnStats]]:
        """After `prefill_video`: answers several first questions at once -> [(answer, stats)].

        The prefix cache is broadcast to one row per question, the questions' own words are
        prefilled together (left-padded: pad slots are masked and take no RoPE position) and the
        rows decode together, so B questions cost about one question's decode steps. Greedy answers
        equal `fork().ask(question)` one at a time. Each row's `ttft_s` is the batch's first token;
        `e2el_s` runs to the row's own last token. This conversation's cache and ids are left as they were."""
        if self.prefix is None or self.turns:
            raise RuntimeError("ask_many() answers first questions after prefill_video()")
        started = time.perf_counter()
        results: list[tuple[str, TurnStats] | None] = [None] * len(questions)
        rows = []  # (index, ids after the prefix, whole prompt length)
        for i, question in enumerate(questions):
            tokenized = self._first_prompt(question, self._preamble(self.prefix), self.prefix.visual_tokens)
            rest = tokenized.ids[len(self.prefix):].tolist()
            fits = self.prefix.fits(len(rest) + self.sampling.max_new_tokens)
            if self.max_context_tokens or not fits or not _starts_with(tokenized, self.prefix):
                chat = self.fork()  # may need to evict or refuse: alone, as ask() would
                results[i] = ("".join(chat.ask(question)), chat.last)
            else:
                rows.append((i, rest, len(tokenized)))
        if rows:
            ttft, answers = self._decode_batch([ids for _, ids, _ in rows], started)
            for (i, _, prompt_tokens), (text, ids, e2el) in zip(rows, answers):
                results[i] = (text, self._prefix_stats(
                    timings={}, prompt_tokens=prompt_tokens, generated_tokens=len(ids),
                    ttft_s=ttft, e2el_s=e2el, answer_ids=[t for t in ids if t not in self.stop_ids]))
        return results

    def _decode_batch(self, continuations: list[list[int]], started: float) -> tuple[float, list[tuple[str, list[int], float]]]:
        """Prefills left-padded continuations after the shared prefix and decodes every row greedily
        (or by `sampling`) until each stopped -> (seconds to the first tokens, [(text, generated ids,
        seconds to its last token)]).
        Rows and widths are rounded up (powers of two, blocks of 16) so few shapes compile."""
        real = len(continuations)
        batch = 1 << (real - 1).bit_length()
        width = round_up(max(map(len, continuations)), 16)
        rows = continuations + [continuations[0]] * (batch - real)  # filler rows, discarded
        ids = np.zeros((batch, width), np.int32)
        mask = np.zeros((batch, width), bool)
        for r, row in enumerate(rows):
            ids[r, width - len(row):], mask[r, width - len(row):] = row, True
        cache = broadcast_cache(self.cache, batch)
        cache = grow_cache(cache, round_up(len(self.ids) + width + self.sampling.max_new_tokens, CACHE_BLOCK))
        embeds = self.engine.text_embeddings(ids)
        token, cache = prefill(self.lm_graphdef, self.lm_state, embeds, jnp.asarray(mask), cache, self.sampling,
                               self._next_rng(), False, False)
        generated = [[t] for t in np.asarray(token)[:real].tolist()]
        first = time.perf_counter()
        finished = [first if g[-1] in self.stop_ids else None for g in generated]  # when each row stopped
        for _ in range(self.sampling.max_new_tokens - 1):
            if all(f is not None for f in finished):
                break
            token, cache = decode_step(self.lm_graphdef, self.lm_state, token, cache, self.sampling, self._next_rng())
            now = time.perf_counter()
            for r, t in enumerate(np.asarray(token)[:real].tolist()):
                if finished[r] is None:
                    generated[r].append(t)
                    if t in self.stop_ids:
                        finished[r] = now
        end = time.perf_counter()
        answers = [(self._decode_text(g, complete=True), g, (end if f is None else f) - started)
                   for g, f in zip(generated, finished)]
        return first - started, answers

    def ask(self, question: str) -> Iterator[str]:
        """Streams the answer's text; `self.last` holds the turn's TurnStats once the answer ends
        (or the caller stops reading it: the conversation goes on from what was generated)."""
        started = time.perf_counter()
        timings = {}
        if self.prefix is None:  # the first question reads the video
            timings = self.prefill_video().timings
        turn = self._first_turn(question) if not self.turns else self._next_turn(question)
        turn.stats.timings.update({name: seconds + turn.stats.timings.get(name, 0.0) for name, seconds in timings.items()})
        yield from self._generate(turn, started)

    # -- prompts

    def _preamble(self, prefix: VideoPrefix) -> str:
        return prefix.time_instruction(self.settings.time_instruction)

    def _first_prompt(self, question: str, preamble: str, visual_tokens: int) -> prompts.TokenizedPrompt:
        pieces = prompts.conversation_pieces([("human", question)], preamble, system=self.system, add_generation_prompt=True)
        return prompts.tokenize(self.tokenizer, pieces, visual_tokens)

    def _first_turn(self, question: str) -> "_Turn":
        """The first question: its words after the prefix (and the time instruction, unless the
        prefix already ends with it)."""
        prefix, tokenized, needed = self._question_prefix(question)
        if not _starts_with(tokenized, prefix):
            raise RuntimeError("the first turn does not start with the video prefix's tokens")  # a bug: pieces are tokenised apart
        prefix.make_room(needed)
        self._adopt(prefix)
        rest = tokenized.ids[len(prefix):].tolist()
        stats = self._prefix_stats(prompt_tokens=len(tokenized), timings={})
        return _Turn(self.engine.text_embeddings(rest), self.cache, rest, [False] * len(rest), stats)

    def _question_prefix(self, question: str) -> tuple[VideoPrefix, prompts.TokenizedPrompt, int]:
        """(this question's copy of the prefix, its whole first turn, slots it needs beyond the
        prefix): the prefix with the time instruction when the question's tokens start with it and
        fit; else the video prefix alone, in a bounded cache without its oldest GOPs until the
        question and its answer fit (the time instruction then lists the GOPs kept)."""
        ready = self.prefix
        tokenized = self._first_prompt(question, self._preamble(ready), ready.visual_tokens)
        needed = lambda p: len(tokenized) - len(p) + self.sampling.max_new_tokens  # noqa: E731
        if ready.base is None or (_starts_with(tokenized, ready) and ready.fits(needed(ready))):
            prefix = ready.fork()
        else:
            prefix = ready.base.fork()
        while prefix.max_tokens and not prefix.fits(needed(prefix)) and prefix.held:
            prefix.evict_oldest()
            tokenized = self._first_prompt(question, self._preamble(prefix), prefix.visual_tokens)
        return prefix, tokenized, needed(prefix)

    def _next_turn(self, question: str) -> "_Turn":
        ids = self._close_previous_answer()
        ids += prompts.tokenize(self.tokenizer, prompts.user_pieces(question) + prompts.assistant_header()).ids.tolist()
        needed = len(self.ids) + len(ids) + self.sampling.max_new_tokens
        limit = self.max_context_tokens or self.engine.context
        if needed > limit:
            flag = "--max-context-tokens" if self.max_context_tokens else "the model's context"
            raise VideoInputError(f"this conversation ({len(self.ids)} tokens) and the next question with its answer "
                                  f"({needed - len(self.ids)}) outgrow {flag} ({limit} tokens); start a new chat")
        stats = TurnStats(visual_tokens=0, prompt_tokens=len(ids), generated_tokens=0, ttft_s=0.0, e2el_s=0.0,
                          keyframes=0, p_steps=0, video_seconds=self.prefix.seconds)
        cache = grow_cache(self.cache, min(round_up(needed, CACHE_BLOCK), max(limit, self.cache.length)))
        return _Turn(self.engine.text_embeddings(ids), cache, ids, [False] * len(ids), stats)

    def _close_previous_answer(self) -> list[int]:
        """Ids ending the previous assistant turn: its last token (still outside the cache), the
        <|im_end|> if generation stopped without it, and the newline the template puts after it."""
        im_end = self.tokenizer.convert_tokens_to_ids(prompts.IM_END)
        ids = [] if self.pending is None or self.pending in self.stop_ids else [self.pending]
        return ids + [im_end] + prompts.encode_text(self.tokenizer, "\n")

    def _append(self, ids: list[int], is_visual: list[bool]) -> None:
        self.ids += ids
        self.is_visual += is_visual

    # -- generation

    def _next_rng(self):
        self.rng, step = jax.random.split(self.rng)
        return step

    def _generate(self, turn: "_Turn", started: float) -> Iterator[str]:
        """Prefills the turn, then decodes. The conversation (ids, cache, pending token) changes only
        once the prefill succeeded, and stays consistent if the caller stops reading early."""
        clock, stats = time.perf_counter(), turn.stats
        token, self.cache = prefill(self.lm_graphdef, self.lm_state, turn.embeds, jnp.ones(turn.embeds.shape[:2], bool),
                                    turn.cache, self.sampling, self._next_rng(), False, False)
        self._append(turn.ids, turn.is_visual)
        generated = [int(token[0])]
        self.pending = generated[-1]
        stats.timings["prefill_s"] = stats.timings.get("prefill_s", 0.0) + time.perf_counter() - clock
        stats.ttft_s = time.perf_counter() - started
        text = ""
        try:
            while generated[-1] not in self.stop_ids:
                new_text = self._decode_text(generated)
                if len(new_text) > len(text):
                    yield new_text[len(text):]
                    text = new_text
                if len(generated) >= self.sampling.max_new_tokens:
                    break
                token, self.cache = decode_step(self.lm_graphdef, self.lm_state, token, self.cache, self.sampling,
                                                self._next_rng())
                self._append([generated[-1]], [False])
                generated.append(int(token[0]))
                self.pending = generated[-1]
            final = self._decode_text(generated, complete=True)  # bytes held back for a character that never came
            if len(final) > len(text):
                yield final[len(text):]
        finally:
            stats.generated_tokens = len(generated)
            stats.e2el_s = time.perf_counter() - started
            stats.answer_ids = [t for t in generated if t not in self.stop_ids]
            self.turns.append(stats)

    def _decode_text(self, ids: list[int], complete: bool = False) -> str:
        text = self.tokenizer.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)
        return text if complete else text.rstrip("\ufffd")  # an incomplete character waits for its next token

