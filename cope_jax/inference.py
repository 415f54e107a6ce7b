"""Answering questions about video with CoPEVideoLM (today: the dense LLaVA-Video keyframe path).

Prompt = LLaVA-Video's `qwen_1_5` ChatML conversation with one `<image>` placeholder, exactly as
LLaVA-NeXT builds it (`conv_qwen_1_5`, `tokenizer_image_token`): the placeholder is replaced by
the visual tokens of all keyframes, in order, each frame's rows ending in `image_newline`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cope_jax.generation import SamplingConfig, generate_from_embeddings
from cope_jax.models.cope.modeling import CoPEVideoLM

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"


def chat_prompt(question: str, system: str = SYSTEM_PROMPT) -> str:
    """LLaVA-NeXT conv_qwen_1_5 with the visual placeholder before the question."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{IMAGE_PLACEHOLDER}\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def split_prompt_ids(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the single visual placeholder (LLaVA tokenizer_image_token)."""
    if prompt.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"prompt must contain exactly one {IMAGE_PLACEHOLDER!r}, found {prompt.count(IMAGE_PLACEHOLDER)}")
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(before), encode(after)


def video_prompt_embeddings(model: CoPEVideoLM, ids_before, visual_tokens: jax.Array, ids_after) -> jax.Array:
    """[text before ; visual tokens [V,D] ; text after] -> embeddings [1,T,D]."""
    lm = model.language_model
    parts = [lm.embed(jnp.asarray(ids_before, jnp.int32)), visual_tokens.astype(lm.dtype),
             lm.embed(jnp.asarray(ids_after, jnp.int32))]
    return jnp.concatenate(parts, axis=0)[None]


def generate_from_keyframes(model: CoPEVideoLM, frames: jax.Array, ids_before, ids_after,
                            sampling: SamplingConfig, rng=None) -> np.ndarray:
    """Keyframes float32[N,H,W,3] (SigLIP-normalised) + prompt ids around the placeholder -> new ids."""
    visual = jax.jit(lambda m, f: m.encode_keyframes(f))(model, frames)  # [N, tokens/frame, D]
    embeds = video_prompt_embeddings(model, ids_before, visual.reshape(-1, visual.shape[-1]), ids_after)
    return generate_from_embeddings(model.language_model, embeds, jnp.ones(embeds.shape[:2], bool), sampling, rng)[0]


def answer(model: CoPEVideoLM, tokenizer, frames: jax.Array, question: str, sampling: SamplingConfig | None = None) -> str:
    """The model's answer to `question` about the video given as keyframes."""
    if sampling is None:
        sampling = SamplingConfig(max_new_tokens=128, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    before, after = split_prompt_ids(tokenizer, chat_prompt(question))
    ids = [int(i) for i in generate_from_keyframes(model, frames, before, after, sampling)]
    eos = set(np.atleast_1d(sampling.eos_token_id).tolist()) if sampling.eos_token_id is not None else set()
    end = next((i for i, token in enumerate(ids) if token in eos), len(ids))  # after EOS come pads
    return tokenizer.decode(ids[:end], skip_special_tokens=True)


def normalize_frames(frames_uint8: np.ndarray) -> jax.Array:
    """uint8 [N,H,W,3] -> SigLIP processor normalisation ((x/255 - 0.5)/0.5), float32."""
    return (jnp.asarray(frames_uint8, jnp.float32) / 255.0 - 0.5) / 0.5
