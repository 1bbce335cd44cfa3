"""The training loop as a loop over steps: deterministic data order, AdamW with warmup + cosine or WSD,
accumulation, clipping, non-finite step skipping, balancing-bias hook, metrics, held-out evaluation, atomic
checkpoints, exact resume.

`Trainer.setup` builds (or restores) everything; `train_step(micro_batches)` is one optimizer step that any
caller (pre-training, SFT, GRPO, a distributed trainer) can drive with its own batches and loss; `run` is the
loop that adds evaluation, logging, checkpointing and stopping on a signal. The trainer knows nothing of MoE
internals: it sums the loss the model returns (LM + MTP + balance losses), logs the routing telemetry, and lets
the BiasBalancer update biases after each optimizer step. Resuming restores weights, optimizer state, RNG state,
schedule position and data cursor (`TrainState`), so an interrupted run that resumes ends with bitwise the same
weights as one that never stopped.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from moelm.config import ConfigError
from moelm.data.chat import DEFAULT_CHAT_TEMPLATE, save_chat_template
from moelm.data.pretraining import CorpusSpec, packed_batches
from moelm.data.sources import iter_documents
from moelm.data.tokenizer import EOS, load_tokenizer_file, save_tokenizer_file, special_id, train_tokenizer
from moelm.dist.checkpoint import SHARDS_DIR
from moelm.dist.runtime import init_parallel
from moelm.dist.strategy import ParallelStrategy
from moelm.files import atomic_write_text
from moelm.model.lora import attach_lora, lora_merged, lora_parameters, merge_lora
from moelm.model.peft_format import load_adapter_into, save_adapter
from moelm.model.transformer import MoELM
from moelm.train.allocator import reuse_freed_memory
from moelm.train.bias_balancer import BiasBalancer
from moelm.train.checkpoint import ADAPTER_DIR, is_sharded, load_latest, save_checkpoint, save_sharded_checkpoint
from moelm.train.interrupt import StopOnSignal, TrainingInterrupted
from moelm.train.provenance import RUN_FILE, check_resume, read_run_record, run_record, upgrade_recorded_recipe
from moelm.train.recipe import Recipe
from moelm.train.telemetry import CollapseMonitor, routing_metrics

# What a run writes into its output directory; --overwrite clears these (the content-keyed data cache stays).
RUN_ENTRIES = (
    "checkpoints",
    "model",
    "adapter",
    "metrics.jsonl",
    "run.json",
    "recipe.json",
    "tokenizer.json",
    "tensorboard",
)


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
    remove_run_files(out_dir, RUN_ENTRIES)


def remove_run_files(out_dir: Path, names: Sequence[str]) -> None:
    """Delete the named files and folders of a run (and nothing else) from its output directory."""
    for name in names:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def attention_kernel(setting: str, device: torch.device) -> str:
    """train.attention resolved for the training device: flex_attention where it has a backward (CUDA)."""
    if setting == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if setting == "flex" and device.type != "cuda":
        raise ConfigError(
            f"train.attention=flex needs a CUDA device (torch {torch.__version__.split('+')[0]}'s flex_attention has "
            f"no backward on {device.type}); use train.attention=sdpa or auto"
        )
    return setting


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


def measured_peak_flops(size: int = 1024, repeats: int = 3, device: torch.device | str = "cpu") -> float:
    """FLOP/s of a float32 GEMM on `device` (the one training runs on): the denominator of MFU on machines
    without a spec sheet.

    The operands come from a generator of their own: drawing from the global one after a resume restored its
    state would shift every later random draw (dropout masks, noisy gating) against the uninterrupted run."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device) for _ in range(2))
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    a @ b
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
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
    count) as a pure function of the index, so a resume at any index sees the same data. `evaluate(model)`
    returns held-out metrics.
    """

    def train_batch(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]: ...

    def evaluate(self, model: MoELM) -> dict[str, float]: ...


MicroBatch = tuple[dict[str, torch.Tensor], dict[str, float]]  # model inputs, batch metrics ("tokens" required)
# (model, inputs) -> (loss to backpropagate, metrics to average, routing for the balancer / telemetry)
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float], dict]]


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint must hold besides weights, optimizer and RNG."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    cursor: int = 0  # next micro-batch index
    skipped: int = 0  # non-finite steps skipped so far
    consecutive_skipped: int = 0  # in a row, up to now (not persisted: a resumed run starts afresh)

    def to_checkpoint(self) -> dict[str, int]:
        return {"step": self.step, "cursor": self.cursor, "skipped": self.skipped}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> TrainState:
        return cls(step=int(state["step"]), cursor=int(state["cursor"]), skipped=int(state["skipped"]))


def language_model_loss(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], token_weight: Callable | None = None
) -> tuple[torch.Tensor, dict, dict]:
    """The default loss: what the model returns for labelled inputs (LM + MTP + balance losses).

    token_weight (data parallelism): maps a rank's predicted-token count for one term to the factor that makes
    the rank's mean that term's share of the global mean; each term (LM, each MTP depth) is weighted by its own.
    """
    out = model(**inputs)
    loss, values = out.loss, _loss_values(out)
    if token_weight is not None and out.lm_loss is not None:
        lm_loss = out.lm_loss * token_weight(out.lm_tokens)
        loss = lm_loss
        if out.mtp_terms:
            mtp = sum(term * token_weight(tokens) for term, tokens in out.mtp_terms) / len(out.mtp_terms)
            loss = loss + model.options.mtp_loss_weight * mtp
            values["mtp_loss"] = mtp.item()
        if out.balance_loss is not None:
            loss = loss + out.balance_loss
        # Logged as their share of the global mean: averaged over ranks they are the one-process values.
        values.update(loss=loss.item(), lm_loss=lm_loss.item())
    return loss, values, out.routing


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

    # ------------------------------------------------------------------ parts a subclass may swap
    def prepare_tokenizer(self):  # noqa: ANN201 - tokenizers.Tokenizer
        """Reuse OUT/tokenizer.json, else the recipe's tokenizer, else train one on the corpus."""
        data = self.recipe.data
        if self.tokenizer_file.is_file():
            return load_tokenizer_file(self.tokenizer_file)
        if data.tokenizer:
            tokenizer = load_tokenizer_file(data.tokenizer)
        else:
            docs = iter_documents(data.source, data.text_field, data.builtin_records, self.recipe.train.seed)
            tokenizer = train_tokenizer(docs, vocab_size=data.vocab_size, split_digits=data.split_digits)
            got = tokenizer.get_vocab_size()
            if got < data.vocab_size:
                self.echo(
                    f"tokenizer: {got} tokens of data.vocab_size={data.vocab_size} asked (byte-level BPE stops "
                    "when no pair of tokens repeats in the corpus; the model is sized to what it got)"
                )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_tokenizer_file(tokenizer, self.tokenizer_file)
        return tokenizer

    def prepare_batches(self, tokenizer) -> BatchSource:  # noqa: ANN001
        """Packed pre-training rows, tokenised once into OUT/cache."""
        data, train = self.recipe.data, self.recipe.train
        corpus = CorpusSpec(data.source, data.text_field, data.builtin_records, data.seq_len, data.fim_rate, train.seed)
        return packed_batches(
            corpus, tokenizer, self.out_dir / "cache", data.val_fraction, train.batch_size, train.eval_batches
        )

    def chat_template(self) -> str:
        """The chat template saved with the final model (fine-tuning keeps its base model's)."""
        return DEFAULT_CHAT_TEMPLATE

    def loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], token_weight: Callable | None = None
    ) -> tuple[torch.Tensor, dict[str, float], dict]:
        """The training objective `run` hands to `train_step`: the language-model loss."""
        return language_model_loss(model, inputs, token_weight)

    def extra_state(self) -> dict[str, Any]:
        """What a subclass must add to a checkpoint to resume exactly (plain tensors and containers)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` saved."""

    def begin_step(self, micro_batches: Sequence[MicroBatch]) -> None:
        """Called with a step's whole (unsharded) micro-batches before the first forward: a loss that normalises
        by the whole batch (GRPO's dapo) reads its totals here."""

    def build_model(self, tokenizer) -> MoELM:  # noqa: ANN001
        # No BOS: packing separates documents with EOS and inserts nothing before them, so a model trained here
        # never sees BOS; the saved config says so, and the empty-context prefix (lm-eval's rule) is EOS.
        config = self.recipe.model.replace(
            vocab_size=tokenizer.get_vocab_size(),
            bos_token_id=None,
            eos_token_id=special_id(tokenizer, EOS),
            pad_token_id=special_id(tokenizer, "<pad>"),
        )
        # Built on the meta device: the parallel strategy gives each rank its own shards their seeded values.
        torch.manual_seed(self.recipe.train.seed)
        with torch.device("meta"):
            return MoELM(config, self.recipe.moe)

    # ------------------------------------------------------------------ run
    def run(self, resume: bool = False, overwrite: bool = False, allow_recipe_change: bool = False) -> MoELM:
        """Train to train.max_steps, save OUT/model, print samples; returns the trained model.

        A non-empty output directory needs `resume` (continue it) or `overwrite` (start over). A resume whose
        recipe differs from the checkpoint's in more than cadence, length, device or layout is refused unless
        `allow_recipe_change` (then the change is recorded in run.json). The first SIGINT or SIGTERM ends the
        current step, saves a checkpoint and raises TrainingInterrupted.
        """
        if allow_recipe_change and not resume:
            raise ConfigError("--allow-recipe-change applies to --resume only (a new run has no recorded recipe)")
        claim_output_dir(self.out_dir, resume, overwrite)
        fresh = not resume and not (self.out_dir.is_dir() and any(self.out_dir.iterdir()))
        with StopOnSignal() as stop:
            try:
                self.setup(resume, allow_recipe_change)
            except BaseException:
                if fresh:  # a run that never started leaves nothing that would block the corrected rerun
                    remove_run_files(self.out_dir, (*RUN_ENTRIES, "cache"))
                raise
            train = self.recipe.train
            progress = _Progress(train.max_steps, self.state.step, self.recipe.log.progress and self.context.is_main)
            while self.state.step < train.max_steps:
                requested = self.parallel.agreed_stop(stop.requested)
                if requested is not None:
                    progress.close()
                    self._stop(requested)
                micro_batches = [self.batches.train_batch(self.state.cursor + i) for i in range(train.grad_accum)]
                self.state.cursor += train.grad_accum
                record = self.train_step(micro_batches, self.loss)
                if record is not None:
                    self.after_step(record)
                    progress(self.state.step, record)
            return self.finish()

    def setup(self, resume: bool = False, allow_recipe_change: bool = False) -> None:
        """Tokenizer, batches, model, optimizer, balancer and state: fresh, or restored from the newest intact
        checkpoint when `resume` (after checking the recipe against the one the checkpoint records)."""
        recipe, train, parallel = self.recipe, self.recipe.train, self.recipe.parallel
        latest = load_latest(self.out_dir, warn=_warn) if resume else None
        self.recipe_changes = self._check_recipe(latest, allow_recipe_change)
        if train.reuse_freed_memory:
            reuse_freed_memory()
        context = init_parallel(
            train.device,
            parallel.expert_degree,
            parallel.fsdp,
            parallel.reshard_after_forward,
            parallel.backend,
            parallel.timeout_s,
            recipe.model.n_routed_experts,
            parallel.pipeline_degree,
        )
        if context.pipeline_degree > 1 and type(self).loss is not Trainer.loss:
            raise ConfigError(
                f"parallel.pipeline_degree={context.pipeline_degree}: pipeline stages run pre-training's LM loss "
                "only (moelm train); fine-tuning and GRPO shard with parallel.expert_degree and FSDP"
            )
        self.parallel = ParallelStrategy(
            context,
            torch.bfloat16 if train.dtype == "bfloat16" else None,
            parallel.pipeline_schedule,
            parallel.virtual_stages,
        )
        self.context = self.parallel.context
        if not self.context.is_main:
            self.echo = lambda _line: None  # rank 0 alone prints, logs and writes
        with self.parallel.main_first():  # tokenizer files and the data cache are written once, then read
            self.tokenizer = self.prepare_tokenizer()
            self.batches = self.prepare_batches(self.tokenizer)
        self.parallel.check_batch_size(train.batch_size)
        self.lora = recipe.lora.spec()
        self.model = self._build(latest)
        if self.context.device.type != "cpu":  # batch sources build CPU tensors: they follow the model
            self.model.register_forward_pre_hook(_inputs_to(self.context.device), with_kwargs=True)
        self.optimizer = torch.optim.AdamW(
            lora_parameters(self.model) if self.lora is not None else self.model.parameters(),
            lr=recipe.optim.lr,
            betas=(recipe.optim.beta1, recipe.optim.beta2),
            weight_decay=recipe.optim.weight_decay,
            **self.parallel.optimizer_options(),
        )
        self.balancer = None
        if recipe.moe.bias_update_rate > 0 and self.lora is not None:
            self.echo("lora: moe.bias_update_rate ignored (the routing biases belong to the frozen base model)")
        elif recipe.moe.bias_update_rate > 0:
            self.balancer = BiasBalancer(
                self.model, recipe.moe.bias_update_rate, recipe.moe.bias_update_centered, self.context.dp_group
            )
            self.balancer.register(self.optimizer)
        self.state = TrainState()
        self.saved_step: int | None = None
        if resume:
            self._resume(latest)
        if self.context.is_main:
            atomic_write_text(self.out_dir / RUN_FILE, self.run_json())
        self.peak_flops = measured_peak_flops(device=self.context.device)
        self.monitor = CollapseMonitor()
        self.forward = torch.compile(self.model) if train.compile else self.model

    def _build(self, latest: tuple[Path, dict[str, Any]] | None) -> MoELM:
        """The model laid out over the ranks: seeded shards for a fresh pre-training model (built on meta),
        otherwise the loaded model (a base, or an older full-state checkpoint) distributed. A sharded
        checkpoint's values are read later, with the optimizer's (`_resume`)."""
        model = self.build_model(self.tokenizer).train()
        model.attention_kernel = attention_kernel(self.recipe.train.attention, self.context.device)
        self.flops_per_token = flops_per_token(model, self.recipe.data.seq_len)  # the whole model's, before layout
        if self.lora is not None:
            self.model = model
            self._attach_lora(latest)
        elif latest is not None and not is_sharded(latest[0]):
            saved = MoELM.from_pretrained(latest[0] / "model", dtype=torch.float32, options=self.recipe.moe)
            if model.embed_tokens.weight.is_meta:
                model = saved.train()
            else:
                model.load_state_dict(saved.state_dict())
        if not model.embed_tokens.weight.is_meta:
            return self.parallel.distribute(model)
        if self.base_directory() is not None:  # a base model built on meta: each rank reads its own rows of it
            return self.parallel.load_pretrained(model, self.base_directory())
        return self.parallel.materialize(model, self.recipe.train.seed)

    def base_directory(self) -> Path | None:
        """The base model directory training starts from (LoRA adapters attach to it); None where the trainer
        builds its own model."""
        return None

    def _attach_lora(self, latest: tuple[Path, dict[str, Any]] | None) -> None:
        """Freeze the base model and attach the recipe's adapters: fresh (seeded), or the checkpoint's."""
        if self.base_directory() is None:
            raise ConfigError(
                f"lora.rank={self.lora.rank}: LoRA adapts a base model (moelm sft, moelm grpo); pre-training trains "
                "every weight (set lora.rank=0)"
            )
        if self.context.distributed:
            raise ConfigError(
                f"lora.rank={self.lora.rank} runs in one process (torchrun shards and checkpoints whole models only); "
                "run without torchrun or set lora.rank=0"
            )
        if latest is not None:
            load_adapter_into(self.model, latest[0] / ADAPTER_DIR, self.lora.dropout)
        else:
            torch.manual_seed(self.recipe.train.seed)
            attach_lora(self.model, self.lora)
        trainable = sum(p.numel() for p in lora_parameters(self.model))
        total = sum(p.numel() for p in self.model.parameters())
        self.echo(
            f"lora: rank {self.lora.rank}, alpha {self.lora.alpha:g}, targets {', '.join(self.lora.targets)}: "
            f"{trainable:,} trainable parameters ({trainable / total:.2%} of {total:,}); base weights frozen"
        )

    def _check_recipe(self, latest: tuple[Path, dict[str, Any]] | None, allow_change: bool) -> list[dict[str, Any]]:
        """The recipe-change history to carry on: the checkpoint's, plus this resume's accepted changes."""
        if latest is None:
            return []
        record = read_run_record(latest[0])
        legacy = self.out_dir / "recipe.json"
        if record is None and not legacy.is_file():
            self.echo(f"note: {latest[0]} records no recipe (written by an older moelm); resuming unchecked")
            return []
        source = latest[0] / RUN_FILE if record is not None else legacy
        try:
            recorded = record["recipe"] if record is not None else json.loads(legacy.read_text())
        except ValueError as error:
            raise ConfigError(f"{legacy}: not valid JSON ({error}); cannot check the recipe to resume") from None
        current = self.recipe.to_dict()
        differences = check_resume(upgrade_recorded_recipe(recorded), current, allow_change, str(source))
        step = int(latest[1]["step"])
        for key, old, new in differences:
            self.echo(f"resume: {key} {old!r} -> {new!r} (from step {step})")
        history = list(record.get("recipe_changes", [])) if record is not None else []
        return history + [{"step": step, "key": k, "recorded": o, "now": n} for k, o, n in differences]

    def run_json(self) -> str:
        """This run's run.json: the resolved recipe, versions, world layout, seeds and recipe changes."""
        context = self.context
        world = {
            "world_size": context.world_size,
            "expert_degree": context.expert_degree,
            "pipeline_degree": context.pipeline_degree,
            "fsdp": context.fsdp,
            "device": str(context.device),
        }
        return json.dumps(run_record(self.recipe.to_dict(), world, self.recipe_changes), indent=2)

    def _resume(self, latest: tuple[Path, dict[str, Any]] | None) -> None:
        """Optimizer, RNG and trainer state of the checkpoint whose weights setup() loaded."""
        if latest is None:
            self.echo("no checkpoint to resume from; starting fresh")
            if self.context.is_main:
                self._truncate_metrics(0)
            return
        path, state = latest
        if is_sharded(path):
            self.parallel.load_shards(path / SHARDS_DIR, self.model, self.optimizer)
        else:
            self.parallel.load_full_optimizer_state(self.optimizer, self.model, state["optimizer"])
        rank_states = state.get("rank_rng_states")
        if rank_states is not None and len(rank_states) == self.context.world_size:
            torch.set_rng_state(rank_states[self.context.rank])
        else:  # another world size: same seed stream per rank as a fresh run would have
            torch.set_rng_state(state["torch_rng"])
        self.state = TrainState.from_checkpoint(state)
        self.load_extra_state(state)
        self.saved_step = self.state.step
        if self.context.is_main:
            self._truncate_metrics(self.state.step)
        self.echo(f"resumed from {path} at step {self.state.step}")

    def train_step(self, micro_batches: Sequence[MicroBatch], loss_fn: LossFn = language_model_loss) -> dict | None:
        """One optimizer step over the micro-batches (gradients accumulated, then clipped).

        Returns the step's metrics, or None when the loss or gradient was not finite: then the step is skipped
        and counted (`TrainState.skipped`), and training stops with a checkpoint after train.max_skipped in a row.
        """
        recipe, state = self.recipe, self.state
        start = time.perf_counter()
        lr = learning_rate(state.step, recipe)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        autocast = torch.autocast(
            self.context.device.type,
            dtype=torch.bfloat16,
            enabled=recipe.train.dtype == "bfloat16",
        )
        self.begin_step(micro_batches)
        token_weight = self.parallel.token_weight()
        if "token_weight" not in inspect.signature(loss_fn).parameters:
            loss_of = functools.partial(loss_fn, self.forward)
        else:
            loss_of = functools.partial(loss_fn, self.forward, token_weight=token_weight)
        observe = self.balancer.observe if self.balancer is not None else lambda routing: None
        totals, tokens, routing = self.parallel.accumulate(micro_batches, loss_of, autocast, observe)
        totals = self.parallel.reduce_metrics(totals)
        self.parallel.reduce_gradients(self.model)
        grad_norm = self.parallel.clip_grad_norm(self.model, recipe.optim.grad_clip)
        if not (math.isfinite(totals["loss"]) and torch.isfinite(grad_norm)):
            self._skip_non_finite()
            return None
        state.consecutive_skipped = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        self.monitor.update(routing)
        self.last_routing = routing
        elapsed = time.perf_counter() - start
        tokens_per_s = tokens / elapsed
        exchange = self.parallel.exchange_metrics(self.model, elapsed)
        return {
            "step": state.step,
            **totals,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
            "skipped_steps": state.skipped,
            **exchange,
        }

    def _skip_non_finite(self) -> None:
        """Drop the step's gradients and balancer counts; stop with a checkpoint after too many in a row."""
        state = self.state
        self.optimizer.zero_grad(set_to_none=True)
        if self.balancer is not None:
            self.balancer.counts = {}
        state.consecutive_skipped += 1
        state.skipped += 1
        self.echo(
            f"step {state.step}: non-finite loss or gradient, step skipped ({state.consecutive_skipped} in a row)"
        )
        if state.consecutive_skipped >= self.recipe.train.max_skipped:
            self.save()
            raise TrainingError(
                f"{state.consecutive_skipped} consecutive non-finite steps at step {state.step}; checkpoint saved "
                f"in {self.out_dir / 'checkpoints'} (lower optim.lr or check the data)"
            )
        state.step += 1

    def after_step(self, record: dict[str, float]) -> None:
        """Evaluation, samples, metrics and checkpoints that fall on this step."""
        train, step = self.recipe.train, self.state.step
        if step % train.eval_every == 0 or step == train.max_steps:
            with lora_merged(self.model):  # adapters folded in once for generation (not per step), then restored
                record.update(self.evaluate(self.model, self.batches))
                if step < train.max_steps:
                    self.print_samples(self.model, self.tokenizer)
        if step % train.log_every == 0 or step == train.max_steps or step % train.eval_every == 0:
            # Router telemetry costs a host read per layer: gathered only for the steps that are written.
            record.update(routing_metrics(self.last_routing, self.model, per_expert=False))
            if self.context.is_main:
                self._log(record)
        if step % train.save_every == 0 or step == train.max_steps:
            self.save()

    def finish(self) -> MoELM:
        """Save OUT/model (weights, tokenizer, chat template) and print the final samples; returns the model
        (under torchrun each rank's sharded model: OUT/model is streamed from the last sharded checkpoint, one
        tensor at a time, so no rank gathers the whole model to write it)."""
        model = self.model.eval()
        if self.parallel.sharded_checkpoints:
            if self.saved_step != self.state.step:
                self.save()
            if self.context.is_main:
                from moelm.dist.checkpoint import export_hf

                target = self.out_dir / "model"
                export_hf(self.out_dir / "checkpoints" / f"step-{self.saved_step}", target)
                self._describe_model_dir(target, model)
            self.print_samples(model, self.tokenizer)
            if self.parallel.pipeline is not None and self.context.is_main and self.recipe.log.sample_tokens:
                self._print_samples(MoELM.from_pretrained(self.out_dir / "model"), self.tokenizer)
            return model
        if self.lora is not None:  # the adapters alone, in PEFT's format; the caller gets the merged model
            target = self.out_dir / ADAPTER_DIR
            save_adapter(model, self.lora, target, self.base_directory())
            merge_lora(model)
        else:
            target = self.out_dir / "model"
            model.save_pretrained(target)
        self._describe_model_dir(target, model)
        self._print_samples(model, self.tokenizer)
        return model

    def _describe_model_dir(self, target: Path, model: MoELM) -> None:
        """run.json, tokenizer and chat template beside the saved weights."""
        atomic_write_text(target / RUN_FILE, self.run_json())
        save_tokenizer_file(self.tokenizer, target / "tokenizer.json")
        bos = model.config.bos_token_id
        bos_token = self.tokenizer.id_to_token(bos) if bos is not None else None
        save_chat_template(target, self.chat_template(), bos_token)

    def _stop(self, signum: int) -> None:
        """Checkpoint the last finished step (unless it is saved already) and raise TrainingInterrupted."""
        step = self.state.step
        if step != self.saved_step and step > 0:
            self.save()
        checkpoint = self.out_dir / "checkpoints" / f"step-{self.saved_step}" if self.saved_step is not None else None
        raise TrainingInterrupted(step, signum, str(checkpoint) if checkpoint else None)

    def evaluate(self, model: MoELM, batches: BatchSource) -> dict[str, float]:
        """The data's held-out metrics, computed in eval mode (no noise, eval capacity)."""
        was_training = model.training
        model.eval()
        metrics = batches.evaluate(self.parallel.evaluation_model(model))
        model.train(was_training)
        self.parallel.reshard(model)
        return metrics

    def print_samples(self, model: MoELM, tokenizer) -> None:  # noqa: ANN001
        """Greedy continuations of the recipe's sample prompts (under torchrun: rank 0 generates with a gathered
        copy, since sharded layers cannot run in inference mode and generation lengths differ per prompt)."""
        if not self.recipe.log.sample_prompts or not self.recipe.log.sample_tokens:
            return
        if self.parallel.pipeline is not None:  # never gathered whole; the final samples read OUT/model
            return
        full = self.parallel.full_model(model)
        if self.context.is_main:
            self._print_samples(full, tokenizer)

    def _print_samples(self, model: MoELM, tokenizer) -> None:  # noqa: ANN001
        from moelm.infer.text import TextGenerator

        was_training = model.training
        generator = TextGenerator(model.eval(), tokenizer)
        for prompt in self.recipe.log.sample_prompts:
            text = "".join(generator.stream(prompt, self.recipe.log.sample_tokens))
            self.echo(f"--- sample ---\n{prompt}{text}")
        model.train(was_training)

    # ------------------------------------------------------------------ io
    def save(self) -> None:
        """A checkpoint of the current step: weights, optimizer, RNG and TrainState (under torchrun a sharded
        checkpoint, each rank writing its own pieces; see moelm.train.checkpoint)."""
        state = {
            **self.state.to_checkpoint(),
            "torch_rng": torch.get_rng_state(),
            "rank_rng_states": self.parallel.rank_rng_states(),
            **self.extra_state(),
        }
        texts, keep = {RUN_FILE: self.run_json()}, self.recipe.train.keep_last
        if self.parallel.sharded_checkpoints:
            save_sharded_checkpoint(
                self.out_dir,
                self.state.step,
                self.parallel,
                self.model,
                self.optimizer,
                state,
                self.tokenizer_file,
                keep,
                texts,
            )
        else:
            state["optimizer"] = self.optimizer.state_dict()
            adapter = (self.lora, self.base_directory()) if self.lora is not None else None
            save_checkpoint(
                self.out_dir, self.state.step, self.model, state, self.tokenizer_file, keep, texts, adapter=adapter
            )
        self.saved_step = self.state.step

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


def _inputs_to(device: torch.device) -> Callable:
    """A forward pre-hook moving tensor arguments to `device` (evaluation and sampling batches are built on CPU)."""

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        move = lambda value: value.to(device) if torch.is_tensor(value) else value  # noqa: E731
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    return hook


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
