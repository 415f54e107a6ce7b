"""Asking about a video: one conversation over one KV cache (paper App. I: later turns reuse it).

The first `ask` reads the video's planned steps, encodes every keyframe in one SigLIP call and
every P step in one Δ-encoder call, merges the stream into the prompt and prefills; later turns
prefill only their own tokens after the cached conversation. Answers stream token by token.
Chat, evaluation and the TTFT benchmark all run this code, so what is measured is what users run.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cope_jax.inference.generation import SamplingConfig, decode_step, prefill
from cope_jax.video import prompt as prompts
from cope_jax.video.settings import VideoInputError, VideoSettings
from cope_jax.video.stream import Video, plan_video, round_up, video_batch
from cope_jax.models.cope.modeling import CoPEVideoLM, assemble_stream
from cope_jax.models.qwen2.modeling import KVCache

CACHE_BLOCK = 256  # the KV cache grows in these steps, so a conversation compiles few shapes


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


# ---------------------------------------------------------------------------- jitted pieces


@functools.partial(jax.jit, static_argnums=0)
def _keyframe_table(graphdef, state, keyframes):
    return nnx.merge(graphdef, state).keyframe_token_table(keyframes)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _p_step_table(graphdef, state, mv, residual, zero_delta):
    return nnx.merge(graphdef, state).p_step_token_table(mv, residual, zero_delta)


@functools.partial(jax.jit, static_argnums=0)
def _video_prompt_embeddings(graphdef, state, keyframe_tokens, p_step_tokens, token_source, ids, is_visual):
    visual = assemble_stream(keyframe_tokens, p_step_tokens, token_source)
    return nnx.merge(graphdef, state).merge_visual(ids, is_visual, visual)


@functools.partial(jax.jit, static_argnums=0)
def _text_embeddings(graphdef, state, ids):
    return nnx.merge(graphdef, state).embed(ids)


@dataclasses.dataclass
class _EncodedVideo:
    """A video's token tables and what its first prompt needs."""

    tables: tuple  # (keyframe tokens, P-step tokens)
    token_source: np.ndarray
    visual_tokens: int
    preamble: str
    stats: TurnStats


@dataclasses.dataclass
class _Prefix:
    encoded: _EncodedVideo
    length: int  # tokens of the shared prefix in the cache


@dataclasses.dataclass
class _Turn:
    """A turn ready to prefill: its embeddings, the cache to prefill into, its ids."""

    embeds: jax.Array  # [1,T,D]
    cache: KVCache
    ids: list
    is_visual: list
    stats: TurnStats
    first: bool


def grow_cache(cache: KVCache, length: int) -> KVCache:
    """The same cache with room for `length` slots (new slots empty)."""
    extra = length - cache.length
    if extra <= 0:
        return cache
    pad = lambda x: jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    return KVCache(keys=[pad(k) for k in cache.keys], values=[pad(v) for v in cache.values],
                   key_valid=pad(cache.key_valid), next_position=cache.next_position, end=cache.end)


def broadcast_cache(cache: KVCache, batch: int) -> KVCache:
    """A one-row cache repeated into `batch` rows (questions that share a prefix)."""
    rows = lambda x: jnp.repeat(x, batch, axis=0)  # noqa: E731
    return KVCache(keys=[rows(k) for k in cache.keys], values=[rows(v) for v in cache.values],
                   key_valid=rows(cache.key_valid), next_position=rows(cache.next_position), end=cache.end)


def _ready(x):
    return jax.block_until_ready(x)


# ---------------------------------------------------------------------------- the conversation


class VideoChat:
    """A multi-turn conversation about one video.

        chat = VideoChat(model, tokenizer, settings, video=lambda: video_from_file(path, settings.preprocessing))
        for text in chat.ask("What happens?"):
            print(text, end="")
        chat.last  # TurnStats
    """

    def __init__(self, model: CoPEVideoLM, tokenizer, settings: VideoSettings, video: Callable[[], Video],
                 sampling: SamplingConfig | None = None, seed: int = 0, stop_at_eos: bool = True):
        """`stop_at_eos=False` always generates `sampling.max_new_tokens` (latency benchmarks)."""
        settings.check()
        self.model, self.tokenizer, self.settings, self.load_video = model, tokenizer, settings, video
        self.stop_ids = prompts.stop_token_ids(tokenizer) if stop_at_eos else ()
        self.sampling = sampling or SamplingConfig(max_new_tokens=256)
        self.sampling = dataclasses.replace(self.sampling, eos_token_id=self.stop_ids)
        self.graphdef, self.state = nnx.split(model)
        self.lm_graphdef, self.lm_state = nnx.split(model.language_model)
        self.rng = jax.random.key(seed)
        self.cache: KVCache | None = None
        self.ids: list[int] = []  # every token in the cache, in order (0 at visual slots)
        self.is_visual: list[bool] = []
        self.pending: int | None = None  # the last generated token, not yet in the cache
        self.turns: list[TurnStats] = []
        self.plan = None
        self.prefix: _Prefix | None = None  # set by prefill_video

    @property
    def last(self) -> TurnStats:
        return self.turns[-1]

    # -- one video, many questions

    def prefill_video(self) -> TurnStats:
        """Reads and encodes the video and prefills the prefix every first question shares (system,
        user header, visual stream, time instruction). Then `fork()` per question: each answers
        from this cache, prefilling only its own words (evaluation of many questions per video).
        Returns the prefix's stats (visual tokens; primitives/vision/delta/prefill timings)."""
        if self.cache is not None:
            raise RuntimeError("prefill_video() starts a conversation; this one has already begun")
        clock = time.perf_counter()
        encoded = self._encode_video()
        tokenized = prompts.tokenize(self.tokenizer, prompts.video_prefix_pieces(encoded.preamble), encoded.visual_tokens)
        embeds = _video_prompt_embeddings(self.graphdef, self.state, *encoded.tables, encoded.token_source,
                                          tokenized.ids[None], tokenized.is_visual[None])
        cache = KVCache.init(self.model.config.text, 1, round_up(len(tokenized), CACHE_BLOCK), self.model.language_model.dtype)
        prefill_clock = time.perf_counter()
        _, self.cache = prefill(self.lm_graphdef, self.lm_state, embeds, jnp.ones(embeds.shape[:2], bool), cache,
                                self.sampling, self._next_rng(), True, True)
        _ready(self.cache.end)
        encoded.stats.timings["prefill_s"] = time.perf_counter() - prefill_clock
        encoded.stats.ttft_s = time.perf_counter() - clock
        encoded.stats.prompt_tokens = len(tokenized)
        self._append(tokenized.ids.tolist(), tokenized.is_visual.tolist())
        self.prefix = _Prefix(encoded, len(tokenized))
        return encoded.stats

    def fork(self) -> "VideoChat":
        """A conversation that continues independently from this one's current state (the cache
        arrays are immutable, so nothing is copied)."""
        other = copy.copy(self)
        other.ids, other.is_visual, other.turns = list(self.ids), list(self.is_visual), list(self.turns)
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
            tokenized = self._first_prompt(question, self.prefix.encoded)
            if self._extends_prefix(tokenized):
                rows.append((i, tokenized.ids[self.prefix.length:].tolist(), len(tokenized)))
            else:  # the prompt does not extend the prefix: answered alone, as ask() would
                chat = self.fork()
                results[i] = ("".join(chat.ask(question)), chat.last)
        if rows:
            ttft, answers = self._decode_batch([ids for _, ids, _ in rows], started)
            for (i, _, prompt_tokens), (text, ids, e2el) in zip(rows, answers):
                results[i] = (text, dataclasses.replace(
                    self.prefix.encoded.stats, timings={}, prompt_tokens=prompt_tokens, generated_tokens=len(ids),
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
        cache = grow_cache(cache, round_up(int(cache.end) + width + self.sampling.max_new_tokens, CACHE_BLOCK))
        embeds = _text_embeddings(self.lm_graphdef, self.lm_state, jnp.asarray(ids))
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
        if self.cache is None:
            turn = self._first_turn(question)
        elif self.prefix is not None and not self.turns:
            turn = self._first_turn_after_prefix(question)
        else:
            turn = self._next_turn(question)
        yield from self._generate(turn, started)

    # -- prompts

    def _encode_video(self) -> "_EncodedVideo":
        """Reads the planned steps and runs every keyframe through SigLIP and every P step through
        the Δ-encoder (one call each), timing both."""
        timings = {}
        clock = time.perf_counter()
        video = self.load_video()
        if video.size != self.model.config.vision.image_size:
            raise VideoInputError(f"{video.source}: frames are {video.size} px, the model's tower takes "
                                f"{self.model.config.vision.image_size} px (preprocess with --size "
                                f"{self.model.config.vision.image_size})")
        self.plan = plan = plan_video(video, self.settings)
        primitives = video.read(plan.steps)
        cfg = self.model.config
        batch = video_batch([plan], [primitives], cfg.tokens_per_keyframe, cfg.tokens_per_p_step, video.size)
        timings["primitives_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        keyframe_tokens = _ready(_keyframe_table(self.graphdef, self.state, batch.keyframes))
        timings["vision_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        p_step_tokens = _ready(_p_step_table(self.graphdef, self.state, batch.mv, batch.residual,
                                             self.settings.delta_mode == "zero"))
        timings["delta_s"] = time.perf_counter() - clock
        preamble = prompts.time_instruction(plan.duration, plan.timestamps) if self.settings.time_instruction else ""
        stats = TurnStats(visual_tokens=int(batch.lengths[0]), prompt_tokens=0, generated_tokens=0,
                          ttft_s=0.0, e2el_s=0.0, keyframes=plan.num_keyframes, p_steps=plan.num_p_steps,
                          timings=timings)
        return _EncodedVideo((keyframe_tokens, p_step_tokens), batch.token_source, int(batch.lengths[0]), preamble, stats)

    def _first_turn(self, question: str) -> "_Turn":
        encoded = self._encode_video()
        tokenized = self._first_prompt(question, encoded)
        embeds = _video_prompt_embeddings(self.graphdef, self.state, *encoded.tables, encoded.token_source,
                                          tokenized.ids[None], tokenized.is_visual[None])
        cache = KVCache.init(self.model.config.text, 1, round_up(len(tokenized) + self.sampling.max_new_tokens, CACHE_BLOCK),
                             self.model.language_model.dtype)
        encoded.stats.prompt_tokens = len(tokenized)
        return _Turn(embeds, cache, tokenized.ids.tolist(), tokenized.is_visual.tolist(), encoded.stats, first=True)

    def _first_prompt(self, question: str, encoded: "_EncodedVideo") -> prompts.TokenizedPrompt:
        pieces = prompts.conversation_pieces([("human", question)], encoded.preamble, add_generation_prompt=True)
        return prompts.tokenize(self.tokenizer, pieces, encoded.visual_tokens)

    def _first_turn_after_prefix(self, question: str) -> "_Turn":
        """The first question after `prefill_video`: only the words after the shared prefix are
        prefilled, unless tokenising the whole turn does not start with the prefix's ids (then the
        whole turn is prefilled afresh, so answers never depend on sharing)."""
        prefix = self.prefix
        tokenized = self._first_prompt(question, prefix.encoded)
        stats = dataclasses.replace(prefix.encoded.stats, timings={}, prompt_tokens=len(tokenized), ttft_s=0.0)
        if not self._extends_prefix(tokenized):
            self.cache, self.ids, self.is_visual = None, [], []
            embeds = _video_prompt_embeddings(self.graphdef, self.state, *prefix.encoded.tables,
                                              prefix.encoded.token_source, tokenized.ids[None], tokenized.is_visual[None])
            cache = KVCache.init(self.model.config.text, 1, round_up(len(tokenized) + self.sampling.max_new_tokens,
                                                                     CACHE_BLOCK), self.model.language_model.dtype)
            return _Turn(embeds, cache, tokenized.ids.tolist(), tokenized.is_visual.tolist(), stats, first=True)
        rest = tokenized.ids[prefix.length:].tolist()
        embeds = _text_embeddings(self.lm_graphdef, self.lm_state, jnp.asarray(rest, jnp.int32)[None])
        needed = round_up(int(self.cache.end) + len(rest) + self.sampling.max_new_tokens, CACHE_BLOCK)
        return _Turn(embeds, grow_cache(self.cache, needed), rest, [False] * len(rest), stats, first=False)

    def _extends_prefix(self, tokenized: prompts.TokenizedPrompt) -> bool:
        """Whether a whole first turn, tokenised alone, starts with the shared prefix's ids (else it
        is prefilled afresh, so answers never depend on sharing)."""
        n = self.prefix.length
        return tokenized.ids[:n].tolist() == self.ids[:n] and tokenized.is_visual[:n].tolist() == self.is_visual[:n]

    def _next_turn(self, question: str) -> "_Turn":
        ids = self._close_previous_answer()
        ids += prompts.tokenize(self.tokenizer, prompts.user_pieces(question) + prompts.assistant_header()).ids.tolist()
        needed = int(self.cache.end) + len(ids) + self.sampling.max_new_tokens
        embeds = _text_embeddings(self.lm_graphdef, self.lm_state, jnp.asarray(ids, jnp.int32)[None])
        stats = TurnStats(visual_tokens=0, prompt_tokens=len(ids), generated_tokens=0, ttft_s=0.0, e2el_s=0.0,
                          keyframes=0, p_steps=0)
        return _Turn(embeds, grow_cache(self.cache, round_up(needed, CACHE_BLOCK)), ids, [False] * len(ids), stats,
                     first=False)

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
        # The first prefill is an empty cache and one unpadded row: it reads only its own keys and
        # may take a fused causal kernel.
        token, self.cache = prefill(self.lm_graphdef, self.lm_state, turn.embeds, jnp.ones(turn.embeds.shape[:2], bool),
                                    turn.cache, self.sampling, self._next_rng(), turn.first, turn.first)
        self._append(turn.ids, turn.is_visual)
        generated = [int(token[0])]
        self.pending = generated[-1]
        stats.timings["prefill_s"] = time.perf_counter() - clock
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

