"""Tokenizers through HF `tokenizers`: train a byte-level BPE on a corpus, or load any tokenizer.json.

Special tokens cover what the later stages need (BOS/EOS/pad, chat roles, R1-style <think> tags), so one
tokenizer serves pre-training, fine-tuning and serving; it is saved as `tokenizer.json` in the model directory.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moelm.files import atomic_path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # R1-style reasoning: <think> reasoning </think> answer
FIM_BEGIN, FIM_HOLE, FIM_END = "<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"  # fill-in-the-middle (moelm.data.fim)
SPECIAL_TOKENS = (
    BOS,
    EOS,
    PAD,
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    THINK_OPEN,
    THINK_CLOSE,
    FIM_BEGIN,
    FIM_HOLE,
    FIM_END,
)


MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2, split_digits: bool = False
) -> Tokenizer:
    """Byte-level BPE trained on `texts`; special tokens get the first ids (BOS 0, EOS 1, PAD 2). split_digits
    makes every digit its own pre-token first, so no merge ever joins two digits."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"invalid vocab_size={vocab_size}: must be at least {MIN_VOCAB_SIZE} (bytes + specials)")
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json (a file or a directory holding one), naming the file when it is missing."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file {file} not found")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception for malformed JSON
        raise ValueError(f"{file}: not a readable tokenizer.json ({error})") from None


def special_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a special token, with a clear error for tokenizers that lack it."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {token!r} token")
    return token_id


def save_tokenizer_file(tokenizer: Tokenizer, path: str | Path) -> None:
    """Write tokenizer.json atomically (a reader never sees half a file)."""
    with atomic_path(path) as tmp:
        tokenizer.save(str(tmp))


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the character byte-level BPE writes for each byte, to the byte.
    Printable Latin-1 bytes stand for themselves; the other 68 are shifted to 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


def token_label(tokenizer: Tokenizer, token: int) -> str:
    """A token's text, or "bytes:\\xNN..." when it holds part of a UTF-8 character (whose text alone would be
    U+FFFD, the same for many tokens): a distinct label per token for OpenAI's top_logprobs keys."""
    text = tokenizer.decode([token], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text
    table = _byte_of_char()
    piece = tokenizer.id_to_token(token) or ""
    if not all(char in table for char in piece):  # not byte-level BPE: the text is all there is
        return text
    return "bytes:" + "".join(f"\\x{table[char]:02x}" for char in piece)
