"""Asking CoPE-VideoLM about a video: the one path chat, evaluation and the benchmarks use.

    from cope_jax import inference
    model, tokenizer, settings = inference.load("~/jax/cope-7b")
    video = inference.video_from_file("clip.mp4", settings.preprocessing)
    chat = inference.VideoChat(model, tokenizer, settings, video=lambda: video)
    print("".join(chat.ask("What happens in the video?")), chat.last)

- `prompt`: LLaVA-Video's `qwen_1_5` template and time instruction (shared with stage-2 loss masks);
- `stream`: the docs/architecture.md §7 switches (`VideoSettings`), step plans and static-shape video batches;
- `session`: `VideoChat`, multi-turn generation over one KV cache with streaming and timings.
"""

from __future__ import annotations

import dataclasses
import os

from cope_jax import checkpoints
from cope_jax.inference.prompt import IMAGE_PLACEHOLDER, SYSTEM_PROMPT, time_instruction  # noqa: F401
from cope_jax.inference.session import TurnStats, VideoChat  # noqa: F401
from cope_jax.inference.stream import (  # noqa: F401
    Video, VideoBatch, VideoInputError, VideoPlan, VideoSettings, plan_video, video_batch, video_from_file,
    video_from_records)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json")


def load_tokenizer(directory: str):
    """The tokenizer saved beside a checkpoint (never downloaded)."""
    import transformers

    if not any(os.path.exists(os.path.join(directory, name)) for name in ("tokenizer.json", "vocab.json")):
        raise checkpoints.CheckpointError(f"{directory}: no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                                          "cope_jax.convert copies them from the source checkpoint")
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise checkpoints.CheckpointError(f"{directory}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None


def load(directory: str, *, mesh=None, **switches):
    """A CoPE checkpoint -> (model, tokenizer, VideoSettings). `switches` override the saved
    settings (keyframes_per_gop=1, delta_mode="zero", dense_frames=64, ...)."""
    directory = os.path.abspath(os.path.expanduser(directory))
    meta = checkpoints.read_meta(directory)
    if meta["kind"] != "cope":
        raise checkpoints.CheckpointError(f"{directory}: holds a {meta['kind']} model, not a CoPE-VideoLM "
                                          "(assemble one with python -m cope_jax.convert --source ... --delta-encoder ...)")
    settings = VideoSettings.from_dict(meta.get("video", {}))
    settings = dataclasses.replace(settings, **{k: v for k, v in switches.items() if v is not None})
    settings.check()
    tokenizer = load_tokenizer(directory)
    model = checkpoints.load(directory, mesh=mesh)
    return model, tokenizer, settings
