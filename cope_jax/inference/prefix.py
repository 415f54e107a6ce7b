"""A video prefix in a KV cache: the system turn, the user header and the visual tokens of the video
so far, grown one chunk at a time (a file's GOP, or a live stream's step as it arrives).

LLaVA-Video's prompt puts the video before the time instruction and the question, so every question
about a video starts with these tokens: the prefix is built once and each question forks it and
appends only its own words. A finished file is prefilled chunk by chunk as well, so a video of any
length needs the working memory of one GOP (its keyframes through SigLIP, its P steps through the
Δ-encoder, one chunk of activations) beside the cache, and a live stream grows the same prefix one
step at a time, so a question asked mid-stream finds its video already in the cache.

`max_tokens` bounds the cache: the oldest GOPs leave it when the video outgrows it (the system turn
and the user header stay; the kept keys keep the RoPE positions they were written with, as streaming
LLMs do). Without a bound a video beyond the model's context is refused with one line.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cope_jax.inference.generation import append_chunk, append_chunk_copy
from cope_jax.models.cope.modeling import CoPEVideoLM, assemble_stream
from cope_jax.models.qwen2.modeling import KVCache
from cope_jax.video import prompt as prompts
from cope_jax.video.settings import VideoInputError
from cope_jax.video.stream import Chunk, round_up, video_batch

CACHE_BLOCK = 256  # the cache grows in these steps (at least doubling), so a long video compiles few shapes


# ---------------------------------------------------------------------------- jitted pieces


@functools.partial(jax.jit, static_argnums=0)
def _keyframe_table(graphdef, state, keyframes):
    return nnx.merge(graphdef, state).keyframe_token_table(keyframes)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _p_step_table(graphdef, state, mv, residual, zero_delta):
    return nnx.merge(graphdef, state).p_step_token_table(mv, residual, zero_delta)


@functools.partial(jax.jit, static_argnums=0)
def _visual_embeddings(graphdef, state, keyframe_tokens, p_step_tokens, token_source):
    """A chunk's visual tokens as the LLM's input rows [1,L,D], exactly as a whole prompt merges them."""
    visual = assemble_stream(keyframe_tokens, p_step_tokens, token_source)
    slots = jnp.ones(token_source.shape, bool)
    return nnx.merge(graphdef, state).merge_visual(jnp.zeros(token_source.shape, jnp.int32), slots, visual)


@functools.partial(jax.jit, static_argnums=0)
def _text_embeddings(graphdef, state, ids):
    return nnx.merge(graphdef, state).embed(ids)


def _drop_slots(cache: KVCache, start, count) -> KVCache:
    """The cache without slots [start, start + count): later slots move down, keeping the keys'
    RoPE positions (they were applied when the keys were written) and next_position."""
    slots = jnp.arange(cache.length)
    source = jnp.where(slots >= start, slots + count, slots)
    kept = source < cache.end
    take = lambda x: jnp.take(x, jnp.minimum(source, cache.length - 1), axis=1)  # noqa: E731
    return KVCache(keys=[take(k) for k in cache.keys], values=[take(v) for v in cache.values],
                   key_valid=take(cache.key_valid) & kept[None], next_position=cache.next_position,
                   end=cache.end - count)


# Like appends: in place for the prefix's own cache, a copy for one a fork shares.
_drop_in_place = jax.jit(_drop_slots, donate_argnums=0)
_drop_copy = jax.jit(_drop_slots)


def grow_cache(cache: KVCache, length: int, *, release: bool = False) -> KVCache:
    """The same cache with room for `length` slots (new slots empty), in arrays of its own: the
    grown cache may be donated while the one it came from lives on (a fork's prefix). `release`
    (the caller owns `cache` and drops it) frees each layer's old arrays once the layer is copied,
    so growing holds one layer twice, not the whole cache."""
    extra = length - cache.length
    if extra <= 0:
        return cache
    pad = lambda x: jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731

    def grown(x):
        bigger = pad(x)
        if release:  # the copy first, then the old array goes: one layer held twice at most
            _ready(bigger)
            x.delete()
        return bigger

    grown_cache = KVCache(keys=[grown(k) for k in cache.keys], values=[grown(v) for v in cache.values],
                          key_valid=pad(cache.key_valid), next_position=jnp.array(cache.next_position, copy=True),
                          end=jnp.array(cache.end, copy=True))
    if release and (trim := _malloc_trim()) is not None:
        # On a CPU backend the cache lives in glibc's heap, which keeps freed blocks resident (its
        # mmap threshold rises with the large buffers it frees): without this each growth would
        # leave the old cache's pages in the process for good.
        trim(0)
    return grown_cache


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (macOS, musl: nothing to give back this way)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _ready(x):
    return jax.block_until_ready(x)


class Engine:
    """The model split once, and the jitted pieces every prefix and conversation runs."""

    def __init__(self, model: CoPEVideoLM):
        self.model, self.config = model, model.config
        self.graphdef, self.state = nnx.split(model)
        self.lm_graphdef, self.lm_state = nnx.split(model.language_model)

    @property
    def context(self) -> int:
        """The longest sequence the LLM was trained for (its RoPE's max_position_embeddings)."""
        return self.config.text.max_position_embeddings

    def text_embeddings(self, ids) -> jax.Array:
        """ids [T] (one row) or [B,T] -> [B,T,D]."""
        ids = jnp.asarray(ids, jnp.int32)
        return _text_embeddings(self.lm_graphdef, self.lm_state, ids[None] if ids.ndim == 1 else ids)


# ---------------------------------------------------------------------------- the prefix


@dataclasses.dataclass(frozen=True)
class _Held:
    """A chunk in the cache."""

    tokens: int
    timestamps: np.ndarray
    keyframes: int
    p_steps: int
    gop: int


class VideoPrefix:
    """System turn + user header + the visual tokens of the chunks appended so far, in a KV cache.

        prefix = VideoPrefix(engine, tokenizer, seconds=video.duration)
        for chunk in plan_chunks(video, plan):
            prefix.append(chunk)
        prefix.time_instruction()  # what a question appends first

    `ids` / `is_visual` mirror the cache's slots (0 at visual slots). `fork()` gives an independent
    copy sharing the arrays; the prefix's own appends update its cache in place, so a fork must
    have prefilled its own tokens (a new cache) before the prefix grows again.
    """

    def __init__(self, engine: Engine, tokenizer, *, system: str = prompts.SYSTEM_PROMPT, zero_delta: bool = False,
                 max_tokens: int | None = None, source: str = "the video", seconds: float = 0.0, capacity: int = 0):
        self.engine, self.zero_delta, self.max_tokens, self.source = engine, zero_delta, max_tokens, source
        self.seconds = seconds  # the video's duration so far, as the time instruction states it
        self.in_place = True
        self.held: list[_Held] = []
        self.evicted = {"gops": 0, "tokens": 0}
        self.timings = {"primitives_s": 0.0, "vision_s": 0.0, "delta_s": 0.0, "prefill_s": 0.0}
        header = prompts.tokenize(tokenizer, prompts.video_header_pieces(system))
        self.ids, self.is_visual = header.ids.tolist(), [False] * len(header)
        self.header_tokens = len(header)
        self.tail_tokens = 0  # text after the video (`with_tail`): no GOP may follow it
        self.base: VideoPrefix | None = None  # with a tail: the video prefix it continues
        if max_tokens is not None and max_tokens <= self.header_tokens:
            raise VideoInputError(f"--max-context-tokens {max_tokens} leaves no room after the prompt's "
                                  f"{self.header_tokens} header tokens")
        length = max_tokens or min(round_up(max(capacity, self.header_tokens), CACHE_BLOCK), self._largest_cache())
        self.cache = KVCache.init(engine.config.text, 1, length, engine.model.language_model.dtype)
        self._prefill(engine.text_embeddings(self.ids))

    # -- what it holds

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def visual_tokens(self) -> int:
        return sum(h.tokens for h in self.held)

    @property
    def keyframes(self) -> int:
        return sum(h.keyframes for h in self.held)

    @property
    def p_steps(self) -> int:
        return sum(h.p_steps for h in self.held)

    @property
    def timestamps(self) -> np.ndarray:
        return np.concatenate([h.timestamps for h in self.held]) if self.held else np.zeros(0, np.float32)

    def time_instruction(self, mode: str = "full") -> str:
        """The time instruction for what the cache holds: the video's duration so far and the
        timestamps of the steps still in the cache."""
        return prompts.time_instruction(self.seconds, self.timestamps, mode)

    # -- growing

    def with_tail(self, ids: list[int]) -> "VideoPrefix | None":
        """A fork with text prefilled after the video: a finished video's time instruction, which
        every first question about it starts with, so questions prefill only their own words.
        None when it does not fit without evicting (the instruction describes the GOPs it follows)."""
        if not self.fits(len(ids)):
            return None
        other = self.fork()
        other.make_room(len(ids))
        other._prefill(self.engine.text_embeddings(ids))
        other.ids, other.is_visual = other.ids + list(ids), other.is_visual + [False] * len(ids)
        other.tail_tokens, other.base = len(ids), self
        return other

    def append(self, chunk: Chunk) -> None:
        """Encodes a chunk (its keyframes in one SigLIP call, its P steps in one Δ-encoder call) and
        prefills its tokens onto the cache in one call, after making room for them (chunks that
        follow one another in a GOP must be appended in order: a bounded cache evicts by GOP)."""
        if self.tail_tokens:
            raise RuntimeError("a video prefix with text after it takes no more video")  # a bug: tails go on forks
        engine, cfg = self.engine, self.engine.config
        clock = time.perf_counter()
        size = chunk.primitives["rgb"].shape[1]
        batch = video_batch([chunk], [chunk.primitives], cfg.tokens_per_keyframe, cfg.tokens_per_p_step, size)
        tokens = int(batch.lengths[0])
        self.timings["primitives_s"] += time.perf_counter() - clock
        if tokens == 0:
            return
        self.make_room(tokens, keep_gop=chunk.gop)
        clock = time.perf_counter()
        keyframe_tokens = _ready(_keyframe_table(engine.graphdef, engine.state, batch.keyframes))
        self.timings["vision_s"] += time.perf_counter() - clock
        clock = time.perf_counter()
        p_step_tokens = _ready(_p_step_table(engine.graphdef, engine.state, batch.mv, batch.residual, self.zero_delta))
        self.timings["delta_s"] += time.perf_counter() - clock
        self._prefill(_visual_embeddings(engine.graphdef, engine.state, keyframe_tokens, p_step_tokens, batch.token_source))
        self.held.append(_Held(tokens, np.asarray(chunk.timestamps, np.float32), chunk.num_keyframes, chunk.num_p_steps,
                               chunk.gop))
        self.ids += [0] * tokens
        self.is_visual += [True] * tokens

    def _prefill(self, embeds: jax.Array) -> None:
        clock = time.perf_counter()
        append = append_chunk if self.in_place else append_chunk_copy  # a fork's arrays are shared
        mask = jnp.ones(embeds.shape[:2], bool)
        self.cache = _ready(append(self.engine.lm_graphdef, self.engine.lm_state, embeds, mask, self.cache))
        self.in_place = True  # the cache is now this prefix's own
        self.timings["prefill_s"] += time.perf_counter() - clock

    def fits(self, tokens: int) -> bool:
        """Whether `tokens` more fit under the bound (or the model's context) without evicting."""
        return len(self) + tokens <= (self.max_tokens or self.engine.context)

    def make_room(self, tokens: int, keep_gop: int | None = None) -> None:
        """Room for `tokens` more slots: the oldest GOPs leave a bounded cache (never `keep_gop`,
        the GOP a step joins: its P steps need its keyframe, so a bound below one GOP is refused);
        an unbounded cache grows (at least doubling), and a video beyond the model's context is refused."""
        while self.max_tokens and not self.fits(tokens) and self.held and self.held[0].gop != keep_gop:
            self.evict_oldest()
        if not self.fits(tokens):
            raise VideoInputError(self._refusal(tokens))
        needed = len(self) + tokens
        if needed > self.cache.length:
            length = min(max(round_up(needed, CACHE_BLOCK), 2 * self.cache.length), self._largest_cache())
            self.cache = grow_cache(self.cache, length, release=self.in_place)  # in place: no fork holds it
            self.in_place = True

    def _largest_cache(self) -> int:
        return self.max_tokens or round_up(self.engine.context, CACHE_BLOCK)

    def _refusal(self, tokens: int) -> str:
        if self.max_tokens:
            return (f"{self.source}: --max-context-tokens {self.max_tokens} cannot hold the prompt's "
                    f"{self.header_tokens} header tokens and {tokens} more (a GOP, or a question and its answer); "
                    "raise it")
        return (f"{self.source}: {len(self) + tokens - self.header_tokens} tokens of video and question exceed the "
                f"model's context of {self.engine.context} tokens; keep only the newest video with "
                "--max-context-tokens N, or read fewer tokens (--keyframes-per-gop 1, --max-gops)")

    def check_video_fits(self, visual_tokens: int) -> None:
        """Refuses, before any work, a video whose tokens cannot fit the model's context (unbounded)."""
        if not self.max_tokens and not self.fits(visual_tokens):
            raise VideoInputError(self._refusal(visual_tokens))

    def evict_oldest(self) -> None:
        """The oldest GOP leaves the cache (all its chunks, in one gather); later slots move down,
        keeping their positions."""
        if self.tail_tokens:
            raise RuntimeError("evict from the video prefix, not from one with text after it")  # a bug
        gop = self.held[0].gop
        count = next((i for i, h in enumerate(self.held) if h.gop != gop), len(self.held))
        tokens = sum(h.tokens for h in self.held[:count])
        del self.held[:count]
        drop = _drop_in_place if self.in_place else _drop_copy
        self.cache = drop(self.cache, self.header_tokens, tokens)
        self.in_place = True
        del self.ids[self.header_tokens: self.header_tokens + tokens]
        del self.is_visual[self.header_tokens: self.header_tokens + tokens]
        self.evicted["gops"] += 1
        self.evicted["tokens"] += tokens

    def fork(self) -> "VideoPrefix":
        """An independent prefix sharing this one's arrays (neither updates them in place until it
        has a cache of its own)."""
        other = copy.copy(self)
        other.ids, other.is_visual, other.held = list(self.ids), list(self.is_visual), list(self.held)
        other.evicted, other.timings = dict(self.evicted), dict(self.timings)
        self.in_place = other.in_place = False
        return other

    def nbytes(self) -> int:
        """Bytes of the cache's arrays."""
        return sum(x.nbytes for x in jax.tree.leaves(self.cache))
