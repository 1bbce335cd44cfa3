"""Incremental text: the detokeniser's pieces, stop strings in a growing text, and logprob offsets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moelm.data.tokenizer import SPECIAL_TOKENS, THINK_CLOSE, THINK_OPEN
from moelm.infer.text import IncrementalDetokenizer, StopFinder


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    """A byte-level BPE whose vocabulary holds the 256 single bytes (so any token sequence is possible, including
    ones that split a multi-byte character), merges over multi-byte text, and moelm's special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["naïve café über straße", "日本語のテキスト 数学", "emoji 🙂🚀 mixed ascii", "<think> x </think> y"]
    tokenizer.train_from_iterator(corpus * 30, trainer)
    return tokenizer


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_pieces_add_up_to_decoding_all_tokens(byte_level, data):
    """Random token sequences, multi-byte characters split anywhere: the pushed pieces, then what finish()
    releases, always concatenate to decode(all tokens); specials kept or skipped alike."""
    vocabulary = byte_level.get_vocab_size()
    tokens = data.draw(st.lists(st.integers(0, vocabulary - 1), max_size=40))
    skip = data.draw(st.booleans())
    detokenizer = IncrementalDetokenizer(byte_level, skip_special_tokens=skip)
    pieces = [detokenizer.push(token) for token in tokens]
    pieces.append(detokenizer.finish())
    assert "".join(pieces) == byte_level.decode(tokens, skip_special_tokens=skip)
    assert "".join(pieces) == detokenizer.text
    assert len(detokenizer.offsets) == len(tokens)
    assert detokenizer.offsets == sorted(detokenizer.offsets)


def test_text_of_encoded_unicode_arrives_whole_characters_only(byte_level):
    text = "naïve 日本語 🙂 done"
    detokenizer = IncrementalDetokenizer(byte_level)
    pieces = [detokenizer.push(token) for token in byte_level.encode(text).ids]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)


def test_each_push_decodes_a_bounded_window(byte_level):
    """O(1) per token: no push decodes more than a few tokens, however long the text."""
    lengths = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):  # noqa: ANN001, ANN201
            lengths.append(len(ids))
            return byte_level.decode(ids, skip_special_tokens=skip_special_tokens)

    detokenizer = IncrementalDetokenizer(Counting())
    for token in byte_level.encode("naïve café über straße " * 40).ids:
        detokenizer.push(token)
    assert max(lengths) <= 4


def test_decoding_ends_at_the_first_stop_id(byte_level):
    eos = byte_level.token_to_id("</s>")
    detokenizer = IncrementalDetokenizer(byte_level, stop_ids=[eos])
    for token in [*byte_level.encode("ab").ids, eos, *byte_level.encode("cd").ids]:
        detokenizer.push(token)
    assert detokenizer.text == "ab"


def test_stop_finder_sees_a_stop_string_straddling_two_pieces():
    finder, text = StopFinder(["STOP", "##"]), ""
    for piece in ["abc S", "TO", "P more ##"]:
        text += piece
        finder.search(text)
    assert finder.cut == 4
    assert StopFinder([]).search("anything") is None


def test_completion_logprob_offsets_stay_inside_the_returned_text(byte_level):
    """`</think>` is a special token dropped from a completion's text: the offsets of the tokens after it must
    still point into the text, and consecutive offsets must cut it into each token's piece."""
    from moelm.serve.text_stream import TextStream

    class Generator:
        tokenizer = byte_level

        @staticmethod
        def eos_ids() -> list[int]:
            return [byte_level.token_to_id("</s>")]

    close = byte_level.token_to_id(THINK_CLOSE)
    tokens = [*byte_level.encode("why ").ids, close, *byte_level.encode("naïve yes").ids]
    stream = TextStream(Generator(), stop=["yes"])
    text = stream.full(tokens).content
    offsets = stream.content_offsets(tokens)
    assert text == "why naïve "
    assert len(offsets) == len(tokens) and offsets == sorted(offsets) and offsets[-1] <= len(text)
    pieces = [text[a:b] for a, b in zip(offsets, [*offsets[1:], len(text)], strict=True)]
    assert "".join(pieces) == text
    assert THINK_OPEN not in text and offsets[len(byte_level.encode("why ").ids)] == len("why ")


def test_token_labels_are_distinct_even_for_partial_utf8_tokens(tmp_path):
    from conftest import save_tiny_model_with_tokenizer

    from moelm.data.tokenizer import token_label

    _, tokenizer = save_tiny_model_with_tokenizer(tmp_path)
    labels = [token_label(tokenizer, t) for t in range(tokenizer.get_vocab_size())]
    assert len(set(labels)) == len(labels)  # top_logprobs keys never collide
    partial = [label for label in labels if label.startswith("bytes:")]
    assert partial and "bytes:\\xe2" in labels  # a lone lead byte of a 3-byte character
    assert token_label(tokenizer, tokenizer.token_to_id("the")) == "the"
