"""Multi-task supervised fine-tuning with a curriculum, on the pre-training Trainer (not a fork of it).

`SFTTrainer` swaps three parts of `Trainer`: the tokenizer and model come from a base model directory, and the
batches are chat conversations with the loss on assistant tokens only, drawn by task mixture and curriculum
pacing (`moelm.train.curriculum`). Everything else — optimizer, schedule, accumulation, balancing hooks,
checkpoints, exact resume, metrics — is the pre-training loop's. Each step logs the batch's mean difficulty and
the unlocked fraction of the pool; each evaluation logs held-out loss and exact match per task.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelm.config import ConfigError
from moelm.constants import IGNORE_INDEX
from moelm.data.chat import encode_chat, load_chat_template
from moelm.data.packing import batch_inputs
from moelm.data.sft import SFTExample, length_difficulty, load_source
from moelm.data.sources import DataError
from moelm.data.tokenizer import EOS, PAD, load_tokenizer_file, save_tokenizer_file, special_id
from moelm.eval.exact_match import chat_exact_match
from moelm.model.peft_format import is_adapter_dir
from moelm.model.transformer import MoELM
from moelm.train.curriculum import CurriculumSampler
from moelm.train.trainer import Trainer


@dataclass
class EncodedExample:
    ids: np.ndarray  # token ids, truncated to seq_len
    loss_mask: np.ndarray  # True on assistant tokens
    task: str
    difficulty: float


def encode_examples(
    tokenizer,  # noqa: ANN001 - tokenizers.Tokenizer
    examples: list[SFTExample],
    template: str,
    seq_len: int,
) -> tuple[list[EncodedExample], int]:
    """Chat-encode each example (truncated to seq_len); returns them and how many were truncated."""
    encoded, truncated = [], 0
    for example in examples:
        ids, mask = encode_chat(tokenizer, example.messages, template)
        if len(ids) > seq_len:
            truncated += 1
            ids, mask = ids[:seq_len], mask[:seq_len]
        encoded.append(EncodedExample(np.asarray(ids), np.asarray(mask, dtype=bool), example.task, example.difficulty))
    return encoded, truncated


def collate(rows: list[list[EncodedExample]], seq_len: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs for rows of examples: each row holds one (pad) or several (pack) examples.

    Examples in a row never attend to each other (block-diagonal mask via document ids), positions restart per
    example, and labels are kept only on assistant tokens. Rows are right-padded to seq_len (or the longest).
    """
    width = seq_len or max(sum(len(e.ids) for e in row) for row in rows)
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    docs = np.full((len(rows), width), -1, dtype=np.int64)
    keep = np.zeros((len(rows), width), dtype=bool)
    for r, row in enumerate(rows):
        offset = 0
        for d, example in enumerate(row):
            n = len(example.ids)
            tokens[r, offset : offset + n] = example.ids
            docs[r, offset : offset + n] = d
            keep[r, offset : offset + n] = example.loss_mask
            offset += n
    inputs = batch_inputs(tokens, docs)
    inputs["labels"][~torch.from_numpy(keep)] = IGNORE_INDEX
    return inputs


@dataclass
class SFTBatches:
    """Fine-tuning micro-batches by task mixture and curriculum, plus held-out loss and exact match."""

    train: list[EncodedExample]
    val: list[EncodedExample]
    val_examples: list[SFTExample]
    sampler: CurriculumSampler
    batch_size: int
    seq_len: int
    total_batches: int
    pad_id: int
    batching: str = "pack"
    bucket_batches: int = 8
    eval_batches: int = 4
    tokenizer: Any = None  # with chat_template: greedy exact match on held-out examples; None = loss only
    chat_template: str | None = None
    max_new_tokens: int = 48
    _window: tuple[int, list[list[int]]] | None = field(default=None, repr=False)

    def progress(self, index: int) -> float:
        return min(index / max(self.total_batches, 1), 1.0)

    def train_batch(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        rows = self._packed_rows(index) if self.batching == "pack" else self._padded_rows(index)
        chosen = [example for row in rows for example in row]
        inputs = collate(rows, self.seq_len if self.batching == "pack" else None, self.pad_id)
        metrics = {
            "tokens": float(sum(len(e.ids) for e in chosen)),
            "difficulty_mean": float(np.mean([e.difficulty for e in chosen])),
            "unlocked_frac": self.sampler.unlocked_fraction(self.progress(index)),
        }
        return inputs, metrics

    def _packed_rows(self, index: int) -> list[list[EncodedExample]]:
        """First-fit packing of drawn examples into batch_size rows; the first draw that fits nowhere ends it."""
        rows: list[list[EncodedExample]] = [[] for _ in range(self.batch_size)]
        free = [self.seq_len] * self.batch_size
        progress = self.progress(index)
        for slot in range(64 * self.batch_size):
            example = self.train[self.sampler.draw((index, slot), progress)]
            row = next((r for r in range(self.batch_size) if free[r] >= len(example.ids)), None)
            if row is None:
                break
            rows[row].append(example)
            free[row] -= len(example.ids)
        return [row for row in rows if row]

    def _padded_rows(self, index: int) -> list[list[EncodedExample]]:
        """Length bucketing: a window of bucket_batches batches is drawn together, sorted by length and cut."""
        window, position = divmod(index, self.bucket_batches)
        cached = self._window
        if cached is None or cached[0] != window:
            first = window * self.bucket_batches
            progress = self.progress(first)
            slots = range(self.bucket_batches * self.batch_size)
            draws = [self.sampler.draw((first, slot), progress) for slot in slots]
            draws.sort(key=lambda i: len(self.train[i].ids))
            batches = [draws[b * self.batch_size : (b + 1) * self.batch_size] for b in range(self.bucket_batches)]
            order = np.random.default_rng([self.sampler.seed, window]).permutation(self.bucket_batches)
            self._window = cached = (window, [batches[b] for b in order])
        return [[self.train[i]] for i in cached[1][position]]

    @torch.no_grad()
    def evaluate(self, model: MoELM) -> dict[str, float]:
        """Held-out assistant-token loss per task and overall; greedy exact match per task when enabled."""
        by_task: dict[str, list[EncodedExample]] = defaultdict(list)
        for example in self.val:
            by_task[example.task].append(example)
        metrics: dict[str, float] = {}
        losses = []
        for task, examples in sorted(by_task.items()):
            examples = examples[: self.batch_size * self.eval_batches]
            task_losses = []
            for first in range(0, len(examples), self.batch_size):
                rows = [[e] for e in examples[first : first + self.batch_size]]
                task_losses.append(model(**collate(rows, None, self.pad_id)).lm_loss.item())
            metrics[f"val_loss/{task}"] = float(np.mean(task_losses))
            losses.extend(task_losses)
        if losses:
            metrics["val_loss"] = float(np.mean(losses))
        if self.tokenizer is not None:
            from moelm.infer.text import TextGenerator

            generator = TextGenerator(model, self.tokenizer, self.chat_template or "")
            match, _ = chat_exact_match(generator, self.val_examples, self.max_new_tokens, self.batch_size)
            metrics.update(match)
        return metrics


def split_held_out(examples: list[SFTExample], per_task: int, seed: int) -> tuple[list[SFTExample], list[SFTExample]]:
    """A seeded held-out set of `per_task` examples from each task (at most a fifth of the task)."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        by_task[example.task].append(i)
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for task in sorted(by_task):
        indices = by_task[task]
        count = min(per_task, len(indices) // 5)
        held.update(int(i) for i in rng.choice(indices, size=count, replace=False))
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


@dataclass
class SFTTrainer(Trainer):
    """Fine-tunes the model in `base_model` (a moelm model directory with tokenizer.json) on recipe.sft."""

    base_model: Path | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_model is None:
            raise ConfigError("SFT needs a base model directory (--model DIR)")
        self.base_model = Path(self.base_model)
        if not (self.base_model / "config.json").is_file():
            raise ConfigError(f"base model {self.base_model} has no config.json (expected a moelm model directory)")

    def prepare_tokenizer(self):  # noqa: ANN201 - tokenizers.Tokenizer
        tokenizer = load_tokenizer_file(self.base_model)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer_file(tokenizer, self.tokenizer_file)
        return tokenizer

    def chat_template(self) -> str:
        return load_chat_template(self.base_model)

    def base_directory(self) -> Path:
        return Path(self.base_model)

    def build_model(self, tokenizer) -> MoELM:  # noqa: ANN001
        # Under torchrun (without LoRA, which adapts a whole frozen base) the base is built on the meta device and
        # the parallel strategy reads each rank's rows of it; one process loads it whole.
        # A PEFT adapter directory as the base loads whole: its weights are the base's with the adapters merged.
        sliced = self.parallel.distributed and self.lora is None and not is_adapter_dir(self.base_model)
        device = "meta" if sliced else "cpu"
        model = MoELM.from_pretrained(self.base_model, dtype=torch.float32, device=device, options=self.recipe.moe)
        if model.config.vocab_size < tokenizer.get_vocab_size():
            raise ConfigError(
                f"base model vocab_size={model.config.vocab_size} is smaller than its tokenizer's "
                f"{tokenizer.get_vocab_size()} tokens"
            )
        return model

    def load_examples(self) -> tuple[list[SFTExample], dict[str, float]]:
        """All sources of recipe.sft, reported per source (loaded, skipped with file:line reasons), and the
        mixture weight of each task whose source gave one."""
        sft = self.recipe.sft
        examples: list[SFTExample] = []
        weights: dict[str, float] = {}
        for number, source in enumerate(sft.sources):
            loaded, report = load_source(source, sft.strict)
            for reason in report.skipped[:5]:
                self.echo(f"skipped malformed record: {reason}")
            if report.skipped:
                self.echo(f"sft.sources[{number}] ({source.format}): {len(report.skipped)} record(s) skipped")
            self.echo(f"sft.sources[{number}] ({source.format}): {report.loaded} examples")
            if source.weight is not None:
                for task in {e.task for e in loaded}:
                    weights[task] = source.weight
            examples.extend(loaded)
        if not examples:
            raise DataError("the SFT sources hold no examples")
        return examples, weights

    def prepare_batches(self, tokenizer) -> SFTBatches:  # noqa: ANN001
        sft, train = self.recipe.sft, self.recipe.train
        examples, weights = self.load_examples()
        held_train, held_val = split_held_out(examples, sft.val_examples, train.seed)
        if not held_train:
            raise DataError("no SFT examples left for training after the held-out split")
        template = self.chat_template()
        seq_len = self.recipe.data.seq_len
        if sft.difficulty == "length":
            length_difficulty(held_train)
        encoded, truncated = encode_examples(tokenizer, held_train, template, seq_len)
        val, _ = encode_examples(tokenizer, held_val, template, seq_len)
        if truncated:
            self.echo(f"{truncated} training example(s) longer than data.seq_len={seq_len} were truncated")
        if sft.difficulty == "loss":
            scores = loss_difficulty(
                MoELM.from_pretrained(self.base_model, dtype=torch.float32).eval(), encoded, self.pad_id(tokenizer)
            )
            for example, score in zip(encoded, scores, strict=True):
                example.difficulty = score
        sampler = CurriculumSampler(
            [e.difficulty for e in encoded],
            [e.task for e in encoded],
            pacing=sft.pacing,
            start=sft.pacing_start,
            full_at=sft.pacing_full_at,
            steps=sft.pacing_steps,
            anti=sft.anti_curriculum,
            weights=weights or None,
            temperature=sft.mixture_temperature,
            seed=train.seed,
        )
        return SFTBatches(
            train=encoded,
            val=val,
            val_examples=held_val,
            sampler=sampler,
            batch_size=train.batch_size,
            seq_len=seq_len,
            total_batches=train.max_steps * train.grad_accum,
            pad_id=self.pad_id(tokenizer),
            batching=sft.batching,
            bucket_batches=sft.bucket_batches,
            eval_batches=train.eval_batches,
            tokenizer=tokenizer if sft.eval_exact_match else None,
            chat_template=template,
            max_new_tokens=sft.max_new_tokens,
        )

    @staticmethod
    def pad_id(tokenizer) -> int:  # noqa: ANN001
        return tokenizer.token_to_id(PAD) if tokenizer.token_to_id(PAD) is not None else special_id(tokenizer, EOS)

    def print_samples(self, model: MoELM, tokenizer) -> None:  # noqa: ANN001
        """Greedy replies to the first held-out conversations, <think> included."""
        from moelm.infer.text import TextGenerator

        was_training = model.training
        generator = TextGenerator(model.eval(), tokenizer, self.chat_template(), skip_special_tokens=False)
        for example in self.batches.val_examples[:2]:
            prompt = generator.chat_prompt(example.messages[:-1])
            reply = generator.generate([prompt], self.recipe.sft.max_new_tokens)[0]
            self.echo(f"--- sample ({example.task}) ---\n{prompt}{reply}")
        model.train(was_training)


@torch.no_grad()
def loss_difficulty(model: MoELM, examples: list[EncodedExample], pad_id: int, batch_size: int = 16) -> list[float]:
    """Mean assistant-token loss of each example under a reference model: harder examples score higher."""
    scores = []
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        inputs = collate([[e] for e in chunk], None, pad_id)
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()
        labels = inputs["labels"][:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none"
        )
        valid = labels != IGNORE_INDEX
        per_example = (token_loss * valid).sum(1) / valid.sum(1).clamp(min=1)
        scores.extend(per_example.tolist())
    return scores
