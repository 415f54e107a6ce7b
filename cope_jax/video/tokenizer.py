"""Tokenizers: the one saved beside a checkpoint (`load_tokenizer`), or a small Qwen2-style one built
locally for tiny configs and tests (`chatml_tokenizer`). Nothing downloads one.

The local one is byte-level BPE like Qwen2's, trained in a fraction of a second on the ChatML template and a few
sentences about video, with Qwen2's special tokens: `<|endoftext|>` (EOS and padding),
`<|im_start|>`, `<|im_end|>`. Any text round-trips.
"""

from __future__ import annotations

import os

from cope_jax import checkpoints

QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_CORPUS = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    "<|im_start|>assistant\n",
    "The video lasts for 12.00 seconds, and 8 frames are uniformly sampled from it. These frames are located at "
    "0.00s,1.00s,2.00s,3.00s,4.00s,5.00s,6.00s,7.00s.Please answer the following questions related to this video.",
    "What happens in the video? Describe the motion. Which direction does the square move? A square moves to the "
    "right across a textured background, then the camera pans left. Answer with the option's letter from the given "
    "choices directly. A. left B. right C. up D. down",
)


def chatml_tokenizer(vocab_size: int = 400):
    """A transformers PreTrainedTokenizerFast with `vocab_size` entries (>= 259: 256 bytes + specials)."""
    import tokenizers
    import transformers

    if vocab_size < 256 + len(QWEN2_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(QWEN2_SPECIAL_TOKENS)} (byte-level), got {vocab_size}")
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN2_SPECIAL_TOKENS),
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    model.train_from_iterator(_CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>",
                                                additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def load_tokenizer(directory: str):
    """The tokenizer saved beside a checkpoint (never downloaded)."""
    import transformers  # third-party and slow to import: only when a tokenizer is loaded

    if not any(os.path.exists(os.path.join(directory, name)) for name in ("tokenizer.json", "vocab.json")):
        raise checkpoints.CheckpointError(f"{directory}: no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                              "cope_jax.convert copies them from the source checkpoint")
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as e:
        raise checkpoints.CheckpointError(f"{directory}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
