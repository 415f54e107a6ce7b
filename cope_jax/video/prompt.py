"""LLaVA-Video's prompt, built in one place for chat, evaluation and the stage-2 loss masks.

Template: LLaVA-NeXT `conv_qwen_1_5` (SeparatorStyle.CHATML):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<image>\\n{time instruction}\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

`<image>` becomes the visual token stream. The time instruction is LLaVA-Video's
(`playground/demo/video_demo.py`, `add_time_instruction`), with the sampled steps' timestamps.

A conversation is rendered as `Piece`s and each piece is tokenized on its own, as LLaVA's
`tokenizer_image_token` splits at the placeholder and `preprocess_qwen` tokenizes per role: so the
ids of a conversation are the ids of its turns laid end to end, which lets a chat feed only the
new turn into its KV cache, and the loss mask covers exactly the assistant's words and its
`<|im_end|>` (never the role markers, which LLaVA's own masks have been seen to leak).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cope_jax.video.switches import TIME_INSTRUCTIONS

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class Piece:
    text: str  # IMAGE_PLACEHOLDER for the visual stream
    target: bool = False  # supervised in training (assistant words + their <|im_end|>)

    @property
    def is_visual(self) -> bool:
        return self.text == IMAGE_PLACEHOLDER


def time_instruction(duration: float, timestamps: Sequence[float], mode: str = "full") -> str:
    """The preamble after the video (`switches.TIME_INSTRUCTIONS`): "full" is LLaVA-Video's, with
    every sampled step's timestamp (keyframes and P steps); "duration" leaves the list out; "none" is ""."""
    if mode not in TIME_INSTRUCTIONS:
        raise ValueError(f"time instruction mode must be one of {', '.join(TIME_INSTRUCTIONS)}, got {mode!r}")
    if mode == "none":
        return ""
    located = "These frames are located at " + ",".join(f"{t:.2f}s" for t in timestamps) + "." if mode == "full" else ""
    return (f"The video lasts for {duration:.2f} seconds, and {len(timestamps)} frames are uniformly sampled from it. "
            f"{located}Please answer the following questions related to this video.")


def system_pieces(system: str = SYSTEM_PROMPT) -> list[Piece]:
    return [Piece(f"{IM_START}system\n{system}{IM_END}\n")]


def user_pieces(question: str, video_preamble: str | None = None) -> list[Piece]:
    """A user turn; with `video_preamble` (the time instruction, or "" without one) it carries the video."""
    if video_preamble is None:
        return [Piece(f"{IM_START}user\n{question}{IM_END}\n")]
    text = f"\n{video_preamble}\n{question}" if video_preamble else f"\n{question}"
    return [Piece(f"{IM_START}user\n"), Piece(IMAGE_PLACEHOLDER), Piece(f"{text}{IM_END}\n")]


def video_header_pieces(system: str = SYSTEM_PROMPT) -> list[Piece]:
    """What every question about one video starts with, before its visual stream: the system turn
    and the user header. Pieces are tokenised one by one, so a first turn's ids are these ids, the
    visual slots, then the time instruction and question (`user_pieces`): a video prefix in a KV
    cache is always a prefix of every first turn about that video."""
    return system_pieces(system) + [Piece(f"{IM_START}user\n")]


def video_tail_pieces(video_preamble: str) -> list[Piece]:
    """What a first question says right after the video, before its own words: the time
    instruction. Tokenised alone it is normally the start of the question's piece (pre-tokenisers
    split before a question's first word); `VideoChat` checks that and prefills the whole question
    piece when it is not."""
    return [Piece(f"\n{video_preamble}\n" if video_preamble else "\n")]


def assistant_header() -> list[Piece]:
    return [Piece(f"{IM_START}assistant\n")]


def assistant_pieces(answer: str) -> list[Piece]:
    return assistant_header() + [Piece(f"{answer}{IM_END}", target=True), Piece("\n")]


def conversation_pieces(turns: Sequence[tuple[str, str]], video_preamble: str | None = "",
                        system: str = SYSTEM_PROMPT, add_generation_prompt: bool = False) -> list[Piece]:
    """turns: ("human" | "gpt", text) in order (LLaVA-Video-178K's `from` names); the first human
    turn carries the video unless `video_preamble` is None. With `add_generation_prompt`, ends with
    the assistant header, ready for generation."""
    pieces = system_pieces(system)
    for role, text in turns:
        if role == "human":
            pieces += user_pieces(text, video_preamble)
            video_preamble = None
        elif role == "gpt":
            pieces += assistant_pieces(text)
        else:
            raise ValueError(f"unknown conversation role {role!r} (expected 'human' or 'gpt')")
    return pieces + (assistant_header() if add_generation_prompt else [])


@dataclasses.dataclass(frozen=True)
class TokenizedPrompt:
    ids: np.ndarray  # int32 [T]; 0 at visual slots
    is_visual: np.ndarray  # bool [T]
    is_target: np.ndarray  # bool [T]

    def __len__(self) -> int:
        return len(self.ids)


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize(tokenizer, pieces: Sequence[Piece], visual_tokens: int = 0) -> TokenizedPrompt:
    """Pieces -> ids, the placeholder expanded to `visual_tokens` visual slots."""
    ids, visual, target = [], [], []
    for piece in pieces:
        piece_ids = [0] * visual_tokens if piece.is_visual else encode_text(tokenizer, piece.text)
        ids += piece_ids
        visual += [piece.is_visual] * len(piece_ids)
        target += [piece.target] * len(piece_ids)
    return TokenizedPrompt(np.asarray(ids, np.int32), np.asarray(visual, bool), np.asarray(target, bool))


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Generation ends at <|im_end|> (ChatML) or the tokenizer's own EOS."""
    ids = {tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id}
    return tuple(sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id))
