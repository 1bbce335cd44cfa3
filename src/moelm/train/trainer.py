"""The pre-training loop: deterministic data order, AdamW with warmup + cosine or WSD, accumulation, clipping,
non-finite step skipping, balancing-bias hook, metrics, held-out perplexity, atomic checkpoints, exact resume.

The trainer knows nothing of MoE internals: it sums the loss the model returns (LM + MTP + balance losses),
logs the routing telemetry, and lets the BiasBalancer update biases after each optimizer step. Resuming restores
weights, optimizer state, RNG state, schedule position and data cursor, so an interrupted run that resumes ends
with bitwise the same weights as one that never stopped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from moelm.data.chat import DEFAULT_CHAT_TEMPLATE, save_chat_template
from moelm.data.fim import apply_fim
from moelm.data.packing import batch_inputs, pack_documents_to_files
from moelm.data.sources import DataError, iter_documents
from moelm.data.tokenizer import EOS, load_tokenizer_file, special_id, train_tokenizer
from moelm.files import atomic_write_text
from moelm.model.transformer import MoELM
from moelm.train.allocator import reuse_freed_memory
from moelm.train.bias_balancer import BiasBalancer
from moelm.train.checkpoint import load_latest, save_checkpoint
from moelm.train.interrupt import StopOnSignal, TrainingInterrupted
from moelm.train.recipe import Recipe
from moelm.train.telemetry import CollapseMonitor, routing_metrics

# What a run writes into its output directory; --overwrite clears these (the content-keyed data cache stays).
RUN_ENTRIES = ("checkpoints", "model", "metrics.jsonl", "recipe.json", "tokenizer.json", "tensorboard")


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps); a checkpoint was saved first."""


class OutputDirError(ValueError):
    """The output directory holds another run and neither resuming nor overwriting it was asked for."""


def claim_output_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Make sure a new run never mixes with an old one in `out_dir`.

    A non-empty directory is refused unless the run continues it (`resume`) or starts over (`overwrite`, which
    deletes the old run's files). Like transformers' `overwrite_output_dir`, the safe choice is the default.
    """
    if resume and overwrite:
        raise OutputDirError("--resume and --overwrite exclude each other: continue the run or start it over")
    if resume or not out_dir.is_dir():
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise OutputDirError(
            f"output directory {out_dir} is not empty ({shown}); pass --resume to continue that run, "
            "--overwrite to delete it and start over, or choose another --out"
        )
    for name in RUN_ENTRIES:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def learning_rate(step: int, recipe: Recipe) -> float:
    """Warmup to optim.lr, then cosine to lr * min_lr_ratio, or WSD: stable, then a linear decay."""
    optim, total = recipe.optim, recipe.train.max_steps
    floor = optim.lr * optim.min_lr_ratio
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "wsd":
        decay_start = int(total * (1 - optim.decay_fraction))
        if step < decay_start:
            return optim.lr
        progress = (step - decay_start) / max(1, total - decay_start)
        return optim.lr + (floor - optim.lr) * min(progress, 1.0)
    progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def measured_peak_flops(size: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of a float32 GEMM on this device: the denominator of MFU on machines without a spec sheet."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * size**3 / (time.perf_counter() - start)


def flops_per_token(model: MoELM, seq_len: int) -> float:
    """6 * active non-embedding parameters + causal attention (references §6, halved for causality)."""
    config = model.config
    active = model.num_active_parameters() - model.embed_tokens.weight.numel()
    head_dims = config.qk_head_dim + config.v_head_dim if config.attention == "mla" else 2 * config.gqa_head_dim
    attention = 3 * config.num_hidden_layers * config.num_attention_heads * head_dims * seq_len
    return 6 * active + attention


class BatchSource(Protocol):
    """What the training loop needs from a data pipeline (pre-training rows, SFT conversations, ...).

    `train_batch(index)` returns micro-batch number `index` (model inputs and batch metrics such as the token
    count) as a pure function of the index, so a resume at any index sees the same data.
    """

    def train_batch(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]: ...

    def evaluate(self, model: MoELM) -> dict[str, float]: ...


@dataclass
class PackedBatches:
    """Tokenised, packed train and validation rows, served in a seeded per-epoch order."""

    train_tokens: np.ndarray
    train_docs: np.ndarray
    val_tokens: np.ndarray
    val_docs: np.ndarray
    batch_size: int
    seed: int
    eval_batches: int

    def train_batch(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        rows = self.batch_rows(index * self.batch_size, self.batch_size)
        tokens = self.train_tokens[rows]
        return batch_inputs(tokens, self.train_docs[rows]), {"tokens": float(tokens.size)}

    def batch_rows(self, cursor: int, count: int) -> np.ndarray:
        """Row indices for samples cursor..cursor+count: a fresh seeded permutation every epoch."""
        n_rows = len(self.train_tokens)
        rows = []
        for sample in range(cursor, cursor + count):
            epoch, offset = divmod(sample, n_rows)
            rows.append(self._epoch_order(epoch, n_rows)[offset])
        return np.asarray(rows)

    def _epoch_order(self, epoch: int, n_rows: int) -> np.ndarray:
        """The epoch's row permutation, drawn once (a function of seed and epoch only, so resume-safe)."""
        cached = getattr(self, "_order", None)
        if cached is None or cached[0] != (epoch, n_rows):
            order = np.random.default_rng(self.seed * 1_000_003 + epoch).permutation(n_rows)
            self._order = cached = ((epoch, n_rows), order)
        return cached[1]

    @torch.no_grad()
    def evaluate(self, model: MoELM) -> dict[str, float]:
        """Held-out LM loss and perplexity over the validation rows (or a few batches of them)."""
        if len(self.val_tokens) == 0:
            return {}
        losses = []
        size = self.batch_size
        for first in range(0, min(len(self.val_tokens), size * self.eval_batches), size):
            rows = slice(first, first + size)
            losses.append(model(**batch_inputs(self.val_tokens[rows], self.val_docs[rows])).lm_loss.item())
        loss = sum(losses) / len(losses)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


@dataclass
class Trainer:
    """Runs one recipe into one output directory."""

    recipe: Recipe
    out_dir: Path
    echo: Callable[[str], None] = print
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.tokenizer_file = self.out_dir / "tokenizer.json"

    # ------------------------------------------------------------------ data
    def prepare_tokenizer(self):  # noqa: ANN201 - tokenizers.Tokenizer
        """Reuse OUT/tokenizer.json, else the recipe's tokenizer, else train one on the corpus."""
        data = self.recipe.data
        if self.tokenizer_file.is_file():
            return load_tokenizer_file(self.tokenizer_file)
        if data.tokenizer:
            tokenizer = load_tokenizer_file(data.tokenizer)
        else:
            docs = iter_documents(data.source, data.text_field, data.builtin_records, self.recipe.train.seed)
            tokenizer = train_tokenizer(docs, vocab_size=data.vocab_size)
            got = tokenizer.get_vocab_size()
            if got < data.vocab_size:
                self.echo(
                    f"tokenizer: {got} tokens of data.vocab_size={data.vocab_size} asked (byte-level BPE stops "
                    "when no pair of tokens repeats in the corpus; the model is sized to what it got)"
                )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(self.tokenizer_file))
        return tokenizer

    def _cache_key(self, tokenizer) -> str:  # noqa: ANN001
        """What the packed arrays depend on: source (and its size/mtime), tokenizer, packing options."""
        data = self.recipe.data
        source = Path(data.source)
        stamp = [source.stat().st_size, source.stat().st_mtime_ns] if source.is_file() else None
        parts = [data.source, stamp, data.text_field, data.builtin_records, data.seq_len, data.fim_rate]
        parts += [self.recipe.train.seed, tokenizer.to_str()]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]

    def prepare_batches(self, tokenizer) -> BatchSource:  # noqa: ANN001
        """Tokenise and pack once into OUT/cache (memory-mapped .npy); later runs and resumes reuse it."""
        data = self.recipe.data
        cache = self.out_dir / "cache"
        key = self._cache_key(tokenizer)
        tokens_file, docs_file = cache / f"{key}-tokens.npy", cache / f"{key}-docs.npy"
        if not (tokens_file.is_file() and docs_file.is_file()):
            cache.mkdir(parents=True, exist_ok=True)
            tmp_tokens, tmp_docs = tokens_file.with_suffix(".tmp.npy"), docs_file.with_suffix(".tmp.npy")
            self._tokenise_and_pack(tokenizer, tmp_tokens, tmp_docs)
            tmp_docs.replace(docs_file)
            tmp_tokens.replace(tokens_file)
        tokens, doc_ids = np.load(tokens_file, mmap_mode="r"), np.load(docs_file, mmap_mode="r")
        n_val = int(len(tokens) * data.val_fraction)
        if len(tokens) - n_val < self.recipe.train.batch_size:
            raise DataError(
                f"data source {data.source!r} packs into {len(tokens) - n_val} training sequences of "
                f"{data.seq_len} tokens, fewer than train.batch_size={self.recipe.train.batch_size}"
            )
        split = len(tokens) - n_val
        train = self.recipe.train
        return PackedBatches(
            tokens[:split],
            doc_ids[:split],
            tokens[split:],
            doc_ids[split:],
            train.batch_size,
            train.seed,
            train.eval_batches,
        )

    def _tokenise_and_pack(self, tokenizer, tokens_file: Path, docs_file: Path) -> None:  # noqa: ANN001
        """Stream documents through the tokenizer in chunks and pack them to disk: memory stays bounded."""
        data = self.recipe.data
        docs = iter_documents(data.source, data.text_field, data.builtin_records, self.recipe.train.seed)
        docs = apply_fim(docs, data.fim_rate, self.recipe.train.seed)

        def encoded() -> Iterator[list[int]]:
            while chunk := list(itertools.islice(docs, 1024)):
                yield from (enc.ids for enc in tokenizer.encode_batch(chunk))

        try:
            pack_documents_to_files(encoded(), data.seq_len, special_id(tokenizer, EOS), tokens_file, docs_file)
        except ValueError as error:
            raise DataError(f"data source {data.source!r}: {error}") from None

    def chat_template(self) -> str:
        """The chat template saved with the final model (fine-tuning keeps its base model's)."""
        return DEFAULT_CHAT_TEMPLATE

    # ------------------------------------------------------------------ run
    def build_model(self, tokenizer) -> MoELM:  # noqa: ANN001
        config = self.recipe.model.replace(
            vocab_size=tokenizer.get_vocab_size(),
            bos_token_id=special_id(tokenizer, "<s>"),
            eos_token_id=special_id(tokenizer, EOS),
            pad_token_id=special_id(tokenizer, "<pad>"),
        )
        torch.manual_seed(self.recipe.train.seed)
        return MoELM(config)

    def run(self, resume: bool = False, overwrite: bool = False) -> MoELM:
        """Train to train.max_steps, save OUT/model, print samples; returns the trained model.

        A non-empty output directory needs `resume` (continue it) or `overwrite` (start over). The first SIGINT
        or SIGTERM ends the current step, saves a checkpoint and raises TrainingInterrupted.
        """
        claim_output_dir(self.out_dir, resume, overwrite)
        with StopOnSignal() as stop:
            return self._run(resume, stop)

    def _run(self, resume: bool, stop: StopOnSignal) -> MoELM:
        recipe, train = self.recipe, self.recipe.train
        if train.reuse_freed_memory:
            reuse_freed_memory()
        tokenizer = self.prepare_tokenizer()
        batches = self.prepare_batches(tokenizer)
        model = self.build_model(tokenizer).train()
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=recipe.optim.lr,
            betas=(recipe.optim.beta1, recipe.optim.beta2),
            weight_decay=recipe.optim.weight_decay,
            fused=True,
        )
        balancer = None
        if model.config.bias_update_rate > 0:
            balancer = BiasBalancer(model, model.config.bias_update_rate, model.config.bias_update_centered)
            balancer.register(optimizer)
        step, cursor, skipped_total = 0, 0, 0
        latest = load_latest(self.out_dir, warn=_warn) if resume else None
        if latest is not None:
            path, state = latest
            model.load_state_dict(MoELM.from_pretrained(path / "model").state_dict())
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            step, cursor, skipped_total = state["step"], state["cursor"], state["skipped"]
            self._truncate_metrics(step)
            self.echo(f"resumed from {path} at step {step}")
        elif resume:
            self.echo("no checkpoint to resume from; starting fresh")
            self._truncate_metrics(0)
        (self.out_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
        peak = measured_peak_flops()
        per_token = flops_per_token(model, recipe.data.seq_len)
        monitor = CollapseMonitor()
        consecutive = 0
        progress = _Progress(train.max_steps, step, recipe.log.progress)
        forward = torch.compile(model) if train.compile else model
        device_type = model.embed_tokens.weight.device.type
        autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=train.dtype == "bfloat16")
        saved_step = step if latest is not None else None
        while step < train.max_steps:
            if stop.requested is not None:
                if step != saved_step and step > 0:
                    self._save(step, model, optimizer, cursor, skipped_total)
                    saved_step = step
                progress.close()
                checkpoint = self.out_dir / "checkpoints" / f"step-{saved_step}" if saved_step is not None else None
                raise TrainingInterrupted(step, stop.requested, str(checkpoint) if checkpoint else None)
            start = time.perf_counter()
            lr = learning_rate(step, recipe)
            for group in optimizer.param_groups:
                group["lr"] = lr
            totals: dict[str, float] = {}
            tokens = 0.0
            for _ in range(train.grad_accum):
                inputs, batch_metrics = batches.train_batch(cursor)
                cursor += 1
                tokens += batch_metrics.pop("tokens")
                with autocast:
                    out = forward(**inputs)
                (out.loss / train.grad_accum).backward()
                if balancer is not None:
                    balancer.observe(out.routing)
                for name, value in {**_loss_values(out), **batch_metrics}.items():
                    totals[name] = totals.get(name, 0.0) + value / train.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
            if not (math.isfinite(totals["loss"]) and torch.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                if balancer is not None:
                    balancer.counts = {}
                consecutive += 1
                skipped_total += 1
                self.echo(f"step {step}: non-finite loss or gradient, step skipped ({consecutive} in a row)")
                if consecutive >= train.max_skipped:
                    self._save(step, model, optimizer, cursor, skipped_total)
                    raise TrainingError(
                        f"{consecutive} consecutive non-finite steps at step {step}; checkpoint saved in "
                        f"{self.out_dir / 'checkpoints'} (lower optim.lr or check the data)"
                    )
                step += 1
                continue
            consecutive = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            monitor.update(out.routing)
            elapsed = time.perf_counter() - start
            tokens_per_s = tokens / elapsed
            record = {
                "step": step,
                **totals,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * per_token / peak,
                "skipped_steps": skipped_total,
            }
            if step % train.eval_every == 0 or step == train.max_steps:
                record.update(self.evaluate(model, batches))
                if step < train.max_steps:
                    self.print_samples(model, tokenizer)
            if step % train.log_every == 0 or step == train.max_steps or step % train.eval_every == 0:
                # Router telemetry costs a host read per layer: gathered only for the steps that are written.
                record.update(routing_metrics(out.routing, model, per_expert=False))
                self._log(record)
            progress(step, record)
            if step % train.save_every == 0 or step == train.max_steps:
                self._save(step, model, optimizer, cursor, skipped_total)
                saved_step = step
        model.eval()
        model.save_pretrained(self.out_dir / "model")
        tokenizer.save(str(self.out_dir / "model" / "tokenizer.json"))
        save_chat_template(self.out_dir / "model", self.chat_template())
        self.print_samples(model, tokenizer)
        return model

    def evaluate(self, model: MoELM, batches: BatchSource) -> dict[str, float]:
        """The data's held-out metrics, computed in eval mode (no noise, eval capacity)."""
        was_training = model.training
        model.eval()
        metrics = batches.evaluate(model)
        model.train(was_training)
        return metrics

    def print_samples(self, model: MoELM, tokenizer) -> None:  # noqa: ANN001
        """Greedy continuations of the recipe's sample prompts."""
        from moelm.infer.text import TextGenerator

        was_training = model.training
        generator = TextGenerator(model.eval(), tokenizer)
        for prompt in self.recipe.log.sample_prompts:
            text = "".join(generator.stream(prompt, self.recipe.log.sample_tokens))
            self.echo(f"--- sample ---\n{prompt}{text}")
        model.train(was_training)

    # ------------------------------------------------------------------ io
    def _save(self, step: int, model: MoELM, optimizer, cursor: int, skipped: int) -> None:  # noqa: ANN001
        state = {
            "step": step,
            "cursor": cursor,
            "skipped": skipped,
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        save_checkpoint(self.out_dir, step, model, state, self.tokenizer_file, self.recipe.train.keep_last)

    def _log(self, record: dict[str, float]) -> None:
        self.history.append(record)
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for name, value in record.items():
                if name != "step":
                    writer.add_scalar(name, value, record["step"])
            writer.flush()

    def _tensorboard(self):  # noqa: ANN202 - SummaryWriter or None
        """A TensorBoard writer under OUT/tensorboard when tensorboard is installed (optional)."""
        if not hasattr(self, "_writer"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                self._writer = None
        return self._writer

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines past the resumed step (and a last line cut short by a kill)."""
        path = self.out_dir / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """The step of a metrics line; infinity for a line that is not a complete record."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _warn(message: str) -> None:
    print(f"moelm: warning: {message}", file=sys.stderr)


def _loss_values(out) -> dict[str, float]:  # noqa: ANN001 - MoELMOutput
    values = {"loss": out.loss.item(), "lm_loss": out.lm_loss.item()}
    if out.mtp_loss is not None:
        values["mtp_loss"] = out.mtp_loss.item()
    values.update({name: value.item() for name, value in out.aux_losses.items()})
    return values


class _Progress:
    """A tqdm bar (ETA, loss, tokens/s) when wanted; closed before any final message so lines do not mix."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.total = total
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if enabled else None

    def __call__(self, step: int, record: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        self.bar.refresh()
        if step >= self.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
