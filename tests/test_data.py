"""Built-in corpus (deterministic, verifiable), tokenizer, sources and packing with document boundaries."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from moelm.data.builtin import DOMAINS, builtin_corpus
from moelm.data.packing import batch_inputs, pack_documents_to_files
from moelm.data.sources import DataError, iter_documents
from moelm.data.tokenizer import SPECIAL_TOKENS, train_tokenizer
from moelm.model.transformer import same_document


def test_builtin_corpus_is_deterministic_and_covers_every_domain():
    first = [r.to_dict() for r in builtin_corpus(40, seed=3)]
    assert first == [r.to_dict() for r in builtin_corpus(40, seed=3)]
    assert first != [r.to_dict() for r in builtin_corpus(40, seed=4)]
    assert {r["domain"] for r in first} == set(DOMAINS)
    assert all(r["difficulty"] >= 1 for r in first)


def test_builtin_answers_are_correct():
    for record in builtin_corpus(200, seed=0):
        if record.domain == "code":
            namespace: dict = {}
            exec(record.text, namespace)  # the asserts in the text must pass  # noqa: S102
        elif record.domain == "math":
            assert record.text.endswith(f"#### {record.answer}")
            if record.difficulty <= 2:
                expression = re.match(r"What is (.*)\?", record.prompt).group(1)
                assert str(eval(expression)) == record.answer  # noqa: S307
        elif record.domain == "logic" and record.difficulty <= 2:
            assert str(eval(record.prompt.removeprefix("Evaluate: "))) == record.answer  # noqa: S307


def test_tokenizer_has_special_tokens_first_and_round_trips_text():
    tokenizer = train_tokenizer((r.text for r in builtin_corpus(200)), vocab_size=400)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = "Question: What is 3 + 4?\nAnswer: 7 <think>ok</think> é"
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=10)


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        list(iter_documents(str(path)))
    path.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*'text'"):
        list(iter_documents(str(path)))
    with pytest.raises(DataError, match="not found"):
        list(iter_documents(str(tmp_path / "missing.txt")))


def pack_documents(documents, seq_len, eos_id):
    """Production packing (through its files) as in-memory arrays."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as directory:
        tokens_file, docs_file = Path(directory) / "t.npy", Path(directory) / "d.npy"
        pack_documents_to_files(iter(documents), seq_len, eos_id, tokens_file, docs_file)
        return np.load(tokens_file), np.load(docs_file)


def naive_pack(documents, seq_len, eos_id):
    """The definition, written plainly: documents + EOS concatenated, cut into full rows."""
    tokens = [t for doc in documents for t in [*doc, eos_id]]
    docs = [i for i, doc in enumerate(documents) for _ in range(len(doc) + 1)]
    rows = len(tokens) // seq_len
    shape = (rows, seq_len)
    return np.asarray(tokens[: rows * seq_len]).reshape(shape), np.asarray(docs[: rows * seq_len]).reshape(shape)


def test_packing_restarts_positions_and_masks_across_documents():
    tokens, docs = pack_documents([[5, 6, 7], [8, 9], [10, 11, 12, 13]], seq_len=5, eos_id=1)
    assert tokens.tolist() == [[5, 6, 7, 1, 8], [9, 1, 10, 11, 12]]
    batch = batch_inputs(tokens, docs)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[5, 6, 7, 1, -100], [9, 1, -100, 11, 12]]
    assert batch["document_ids"].shape == tokens.shape  # ids per position travel, not a [B, T, T] mask
    mask = same_document(batch["document_ids"])[0]
    assert not mask[4, :4].any() and mask[:4, :4].all()


def test_packed_documents_do_not_see_each_other():
    from conftest import tiny_config

    from moelm import MoELM

    model = MoELM(tiny_config()).eval()
    tokens, docs = pack_documents([[5, 6, 7, 8], [9, 10, 11, 12, 13]], seq_len=10, eos_id=1)
    batch = batch_inputs(tokens, docs)
    with torch.no_grad():
        packed = model(batch["input_ids"], document_ids=batch["document_ids"], position_ids=batch["position_ids"])
        alone = model(torch.tensor([[9, 10, 11, 12, 13]])).logits
    torch.testing.assert_close(packed.logits[:, 5:10], alone, atol=1e-5, rtol=1e-5)


def test_document_ids_give_the_model_what_an_explicit_block_mask_gives():
    """The mask the model builds from document ids equals a [B, T, T] mask passed in: logits, LM and MTP loss."""
    from conftest import tiny_config

    from moelm import MoELM

    model = MoELM(tiny_config(num_nextn_predict_layers=1)).eval()
    tokens, docs = pack_documents([[5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15, 16]], seq_len=7, eos_id=1)
    batch = batch_inputs(tokens, docs)
    explicit = {**batch, "attention_mask": same_document(batch["document_ids"])}
    del explicit["document_ids"]
    with torch.no_grad():
        from_ids, from_mask = model(**batch), model(**explicit)
    torch.testing.assert_close(from_ids.logits, from_mask.logits, atol=0, rtol=0)
    assert from_ids.lm_loss.item() == from_mask.lm_loss.item()
    assert from_ids.mtp_loss.item() == from_mask.mtp_loss.item()


def test_mtp_targets_never_cross_a_document_boundary():
    from conftest import tiny_config

    from moelm import MoELM

    model = MoELM(tiny_config(num_nextn_predict_layers=1)).eval()
    tokens, docs = pack_documents([[5, 6, 7, 8], [9, 10, 11, 12, 13]], seq_len=10, eos_id=1)
    batch = batch_inputs(tokens, docs)  # docs: positions 0-4 (incl. EOS) and 5-9

    def mtp_loss_with_label(index: int, value: int) -> float:
        labels = batch["labels"].clone()
        labels[0, index] = value
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            return model(**inputs, labels=labels).mtp_loss.item()

    base = mtp_loss_with_label(0, int(batch["labels"][0, 0]))
    # Depth 1: position i predicts the label at i + 2. Index 6 is only the MTP target of position 4, the last
    # token of the first document, so it must be ignored; index 8 is the target of position 6, same document.
    assert mtp_loss_with_label(6, 40) == pytest.approx(base)
    assert mtp_loss_with_label(8, 40) != pytest.approx(base)


def test_fim_rewrites_the_requested_share_in_psm_order_and_loses_nothing():
    import random

    from moelm.data.fim import FIM_BEGIN, FIM_END, FIM_HOLE, apply_fim, to_fim

    text = "def add(a, b):\n    return a + b\n"
    rewritten = to_fim(text, random.Random(1))
    prefix, rest = rewritten.removeprefix(FIM_BEGIN).split(FIM_HOLE)
    suffix, middle = rest.split(FIM_END)
    assert prefix + middle + suffix == text
    docs = [f"document {i}" for i in range(1000)]
    out = list(apply_fim(docs, rate=0.1, seed=0))
    share = sum(d.startswith(FIM_BEGIN) for d in out) / len(out)
    assert 0.07 < share < 0.13
    assert out == list(apply_fim(docs, rate=0.1, seed=0))
    assert list(apply_fim(docs, rate=0.0)) == docs
    tokenizer = train_tokenizer(docs[:50], vocab_size=400)
    assert tokenizer.encode(FIM_HOLE).ids == [tokenizer.token_to_id(FIM_HOLE)]


def test_parquet_source_reads_the_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (pip install moelm[data])")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["first doc", "second doc"], "n": [1, 2]}), path)
    assert list(iter_documents(str(path), text_field="body")) == ["first doc", "second doc"]
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_documents(str(path)))


def test_streamed_packing_to_disk_equals_the_plain_definition(tmp_path):
    rng = np.random.default_rng(0)
    documents = [rng.integers(3, 500, size=rng.integers(1, 40)).tolist() for _ in range(300)]
    expected_tokens, expected_docs = naive_pack(documents, seq_len=16, eos_id=1)
    rows = pack_documents_to_files(
        iter(documents),
        16,
        1,
        tmp_path / "t.npy",
        tmp_path / "d.npy",
        chunk_tokens=50,  # many small chunks
    )
    tokens, docs = np.load(tmp_path / "t.npy", mmap_mode="r"), np.load(tmp_path / "d.npy", mmap_mode="r")
    assert rows == len(expected_tokens) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(docs, expected_docs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy", "t.npy"]  # no raw files left behind


def test_split_digits_tokenizer_never_merges_two_digits_and_round_trips():
    docs = [record.text for record in builtin_corpus(300, seed=1)]
    plain = train_tokenizer(docs, 600)
    split = train_tokenizer(docs, 600, split_digits=True)

    def multi_digit(tokenizer) -> list[str]:  # noqa: ANN001
        return [t for t in tokenizer.get_vocab() if sum(c.isdigit() for c in t) > 1]

    assert multi_digit(plain)  # the corpus's numbers do get merged without the split
    assert not multi_digit(split)
    text = "What is 347 + 28? The answer is 375."
    assert split.decode(split.encode(text).ids) == text
    digits = [t for t in split.encode(text).tokens if any(c.isdigit() for c in t)]
    assert digits == ["3", "4", "7", "2", "8", "3", "7", "5"]


def test_the_recipe_key_split_digits_reaches_the_trained_tokenizer(tmp_path):
    from moelm.train.recipe import load_recipe
    from moelm.train.trainer import Trainer

    def vocabulary(split: str) -> dict:
        recipe = load_recipe(None, ["data.builtin_records=300", "data.vocab_size=600", f"data.split_digits={split}"])
        return Trainer(recipe, tmp_path / split, echo=lambda line: None).prepare_tokenizer().get_vocab()

    assert any(sum(c.isdigit() for c in token) > 1 for token in vocabulary("false"))
    assert not any(sum(c.isdigit() for c in token) > 1 for token in vocabulary("true"))
