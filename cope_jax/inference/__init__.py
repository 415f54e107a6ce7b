"""Asking CoPE-VideoLM about a video: the one path chat, evaluation, serving and the benchmarks use.

    from cope_jax import inference
    from cope_jax.video.stream import video_from_file
    model, tokenizer, settings = inference.load("~/jax/cope-7b")
    video = video_from_file("clip.mp4", settings.preprocessing)
    chat = inference.VideoChat(model, tokenizer, settings, video=lambda: video)
    print("".join(chat.ask("What happens in the video?")), chat.last)

- `prefix`: `VideoPrefix`, the video's tokens in a KV cache, grown a GOP (a file's) or a step (a
  stream's) at a time, bounded or not;
- `session`: `VideoChat`, multi-turn generation over one KV cache with streaming and timings;
- `live`: `LiveVideoChat`, questions about a stream answered while it plays;
- `generation`: prefill, decode steps and sampling over the LLM's KV cache.
What a video becomes (settings, step plan, token stream, prompt) is `cope_jax.video`'s.
"""

from __future__ import annotations

import os

from cope_jax import checkpoints
from cope_jax.inference.prefix import Engine, VideoPrefix  # noqa: F401
from cope_jax.inference.session import TurnStats, VideoChat  # noqa: F401
from cope_jax.video.settings import VideoSettings
from cope_jax.video.tokenizer import load_tokenizer


def load(directory: str, *, mesh=None, **switches):
    """A CoPE checkpoint -> (model, tokenizer, VideoSettings). `switches` override the saved
    settings (keyframes_per_gop=1, delta_mode="zero", dense_frames=64, ...)."""
    directory = os.path.abspath(os.path.expanduser(directory))
    meta = checkpoints.read_meta(directory)
    if meta["kind"] != "cope":
        raise checkpoints.CheckpointError(f"{directory}: holds a {meta['kind']} model, not a CoPE-VideoLM "
                                          "(assemble one with python -m cope_jax.convert --source ... --delta-encoder ...)")
    settings = VideoSettings.from_dict(meta.get("video", {})).with_switches(**switches)
    tokenizer = load_tokenizer(directory)
    model = checkpoints.load(directory, mesh=mesh)
    return model, tokenizer, settings
