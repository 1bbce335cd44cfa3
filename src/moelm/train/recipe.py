"""Training recipes: YAML with sections model, data, optim, train, log; every key overridable as a.b=value.

Unknown keys and invalid values fail before anything runs, naming the key, so a typo never trains for an hour
with a default.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from moelm.config import ConfigError, ModelConfig, coerce_fields, load_config, load_yaml
from moelm.data.tokenizer import MIN_VOCAB_SIZE
from moelm.train.curriculum import PACINGS
from moelm.train.grpo_loss import ADVANTAGE_SCALES, AGGREGATIONS

REWARD_NAMES = ("accuracy", "format", "tag_count", "code")


@dataclass
class DataSection:
    source: str = "builtin"  # 'builtin', a .jsonl file, a .txt file or a folder of .txt files
    text_field: str = "text"
    builtin_records: int = 4000
    tokenizer: str | None = None  # tokenizer.json to use; None = train a byte-level BPE on the corpus
    vocab_size: int = 2048
    seq_len: int = 256
    val_fraction: float = 0.05
    fim_rate: float = 0.0  # share of documents rewritten fill-in-the-middle (PSM); DeepSeek uses 0.1


@dataclass
class OptimSection:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    max_steps: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    save_every: int = 100
    keep_last: int = 2
    eval_every: int = 100
    eval_batches: int = 4
    log_every: int = 10
    max_skipped: int = 5
    dtype: str = "float32"  # float32 | bfloat16 (autocast; weights and optimizer stay float32)
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N; under torchrun cuda:LOCAL_RANK
    compile: bool = False  # torch.compile the model for training
    reuse_freed_memory: bool = True  # glibc: keep freed step buffers for reuse (moelm.train.allocator)


@dataclass
class ParallelSection:
    """Multi-process training under torchrun; ignored (one process, no process group) without it."""

    expert_degree: int = 1  # ranks one expert layer is spread over (expert parallelism); divides world and experts
    fsdp: bool | None = None  # shard parameters, gradients and optimizer state; default: on when world > 1
    reshard_after_forward: bool = True  # free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2)
    backend: str | None = None  # gloo | nccl; default: nccl on CUDA, gloo on CPU
    timeout_s: float = 300.0  # a collective that waits longer fails every rank instead of hanging
    global_balance_loss: bool = False  # aux losses on expert counts all-reduced over ranks (else per micro-batch)


@dataclass
class LogSection:
    sample_prompts: list[str] = field(default_factory=lambda: ["Question: What is 12 + 7?\nAnswer:", "def add_3(x):"])
    sample_tokens: int = 32
    progress: bool = True


@dataclass
class SFTSection:
    """Fine-tuning data: sources with mixture weights, difficulty, curriculum pacing, batching."""

    # Each source: {format: builtin|jsonl|gsm8k|mbpp|bbh|mmlu, path, weight, task (jsonl only)};
    # builtin also takes num_records, seed, domains, max_difficulty.
    sources: list[dict[str, Any]] = field(
        default_factory=lambda: [{"format": "builtin", "num_records": 4000, "domains": ["math"]}]
    )
    mixture_temperature: float = 1.0  # without weights: task probability ∝ size^(1/T)
    strict: bool = False  # malformed records: skipped and reported (False) or fatal (True)
    difficulty: str = "source"  # source | length | loss (mean assistant-token loss under the base model)
    pacing: str = "none"  # none | linear | root | step
    pacing_start: float = 0.2  # fraction of each task unlocked at the start
    pacing_full_at: float = 0.8  # training progress at which everything is unlocked
    pacing_steps: int = 4  # buckets for the step pacing
    anti_curriculum: bool = False  # hardest first (ablation)
    batching: str = "pack"  # pack (block-diagonal attention) | pad (length-bucketed); see benchmarks/sft_batching.py
    bucket_batches: int = 8  # pad: batches drawn together and sorted by length
    val_examples: int = 64  # held-out examples per task (never trained on)
    eval_exact_match: bool = True  # greedy exact match on held-out examples with answers, at every eval
    max_new_tokens: int = 48


@dataclass
class GRPOSection:
    """Reinforcement learning with verifiable rewards: prompts, rollouts, rewards and the GRPO objective."""

    # Prompt sources, as sft.sources: builtin (num_records, seed, domains, max_difficulty) or jsonl records with
    # prompt and answer (and optional tests: a list of assert lines for code prompts).
    sources: list[dict[str, Any]] = field(
        default_factory=lambda: [{"format": "builtin", "num_records": 2000, "domains": ["math"], "max_difficulty": 1}]
    )
    chat_template: bool = True  # ask through the model's chat template (R1 format) or with the plain prompt
    num_generations: int = 4  # G completions per prompt; train.batch_size prompts per micro-batch
    max_completion_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    overlong_cache_tokens: int = 0  # > 0: DAPO soft overlong penalty over the last N tokens before the limit
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO)
    aggregation: str = "grpo"  # grpo | dr_grpo | dapo
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    beta: float = 0.0  # > 0: k3 KL to the frozen base model
    num_iterations: int = 1  # updates per rollout batch (mu); > 1 reuses stored old log-probs
    mask_truncated: bool = False  # drop completions that hit max_completion_tokens from the loss
    eval_prompts: int = 32  # held-out prompts scored greedily at every evaluation


@dataclass
class Recipe:
    model: ModelConfig
    data: DataSection
    optim: OptimSection
    train: TrainSection
    log: LogSection
    sft: SFTSection = field(default_factory=SFTSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def validate(self) -> None:
        """Cross-section checks that dataclass defaults cannot express."""
        checks = [
            (
                "data.seq_len",
                self.data.seq_len,
                2 <= self.data.seq_len <= self.model.max_position_embeddings,
                f"2..model.max_position_embeddings={self.model.max_position_embeddings}",
            ),
            ("data.val_fraction", self.data.val_fraction, 0 <= self.data.val_fraction < 1, "in [0, 1)"),
            ("data.fim_rate", self.data.fim_rate, 0 <= self.data.fim_rate <= 1, "in [0, 1]"),
            ("optim.schedule", self.optim.schedule, self.optim.schedule in ("cosine", "wsd"), "cosine or wsd"),
            ("optim.lr", self.optim.lr, self.optim.lr > 0, "a positive number"),
            ("train.max_steps", self.train.max_steps, self.train.max_steps > 0, "a positive integer"),
            ("train.batch_size", self.train.batch_size, self.train.batch_size > 0, "a positive integer"),
            ("train.grad_accum", self.train.grad_accum, self.train.grad_accum > 0, "a positive integer"),
            ("train.save_every", self.train.save_every, self.train.save_every > 0, "a positive integer"),
            ("train.keep_last", self.train.keep_last, self.train.keep_last > 0, "a positive integer"),
            ("train.dtype", self.train.dtype, self.train.dtype in ("float32", "bfloat16"), "float32 or bfloat16"),
            (
                "train.device",
                self.train.device,
                re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.train.device) is not None,
                "auto, cpu, cuda or cuda:N",
            ),
            (
                "parallel.expert_degree",
                self.parallel.expert_degree,
                self.parallel.expert_degree > 0,
                "a positive integer",
            ),
            (
                "parallel.backend",
                self.parallel.backend,
                self.parallel.backend in (None, "gloo", "nccl"),
                "null (by device), gloo or nccl",
            ),
            ("parallel.timeout_s", self.parallel.timeout_s, self.parallel.timeout_s > 0, "a positive number"),
            (
                "parallel.expert_degree",
                self.parallel.expert_degree,
                self.model.n_routed_experts % self.parallel.expert_degree == 0,
                f"a divisor of model.n_routed_experts={self.model.n_routed_experts}",
            ),
            ("train.eval_every", self.train.eval_every, self.train.eval_every > 0, "a positive integer"),
            ("train.eval_batches", self.train.eval_batches, self.train.eval_batches > 0, "a positive integer"),
            ("train.log_every", self.train.log_every, self.train.log_every > 0, "a positive integer"),
            ("train.max_skipped", self.train.max_skipped, self.train.max_skipped > 0, "a positive integer"),
            (
                "data.vocab_size",
                self.data.vocab_size,
                self.data.vocab_size >= MIN_VOCAB_SIZE,
                f"at least {MIN_VOCAB_SIZE} (256 bytes + special tokens)",
            ),
            ("data.builtin_records", self.data.builtin_records, self.data.builtin_records > 0, "a positive integer"),
            ("optim.min_lr_ratio", self.optim.min_lr_ratio, 0 <= self.optim.min_lr_ratio <= 1, "in [0, 1]"),
            ("optim.weight_decay", self.optim.weight_decay, self.optim.weight_decay >= 0, "a non-negative number"),
            ("optim.beta1", self.optim.beta1, 0 <= self.optim.beta1 < 1, "in [0, 1)"),
            ("optim.beta2", self.optim.beta2, 0 <= self.optim.beta2 < 1, "in [0, 1)"),
            ("optim.warmup_steps", self.optim.warmup_steps, self.optim.warmup_steps >= 0, "a non-negative integer"),
            ("optim.decay_fraction", self.optim.decay_fraction, 0 <= self.optim.decay_fraction <= 1, "in [0, 1]"),
            ("optim.grad_clip", self.optim.grad_clip, self.optim.grad_clip > 0, "a positive number"),
            ("log.sample_tokens", self.log.sample_tokens, self.log.sample_tokens >= 0, "a non-negative integer"),
            (
                "sft.mixture_temperature",
                self.sft.mixture_temperature,
                self.sft.mixture_temperature > 0,
                "a positive number",
            ),
            ("sft.val_examples", self.sft.val_examples, self.sft.val_examples >= 0, "a non-negative integer"),
            ("sft.max_new_tokens", self.sft.max_new_tokens, self.sft.max_new_tokens > 0, "a positive integer"),
            ("sft.pacing", self.sft.pacing, self.sft.pacing in PACINGS, f"one of {list(PACINGS)}"),
            ("sft.batching", self.sft.batching, self.sft.batching in ("pack", "pad"), "pack or pad"),
            (
                "sft.difficulty",
                self.sft.difficulty,
                self.sft.difficulty in ("source", "length", "loss"),
                "source, length or loss",
            ),
            ("sft.pacing_start", self.sft.pacing_start, 0 < self.sft.pacing_start <= 1, "in (0, 1]"),
            ("sft.pacing_full_at", self.sft.pacing_full_at, 0 < self.sft.pacing_full_at <= 1, "in (0, 1]"),
            ("sft.pacing_steps", self.sft.pacing_steps, self.sft.pacing_steps > 0, "a positive integer"),
            ("sft.bucket_batches", self.sft.bucket_batches, self.sft.bucket_batches > 0, "a positive integer"),
            ("sft.sources", self.sft.sources, bool(self.sft.sources), "a non-empty list of sources"),
            ("grpo.sources", self.grpo.sources, bool(self.grpo.sources), "a non-empty list of sources"),
            ("grpo.num_generations", self.grpo.num_generations, self.grpo.num_generations >= 2, "an integer >= 2"),
            (
                "grpo.max_completion_tokens",
                self.grpo.max_completion_tokens,
                self.grpo.max_completion_tokens > 0,
                "a positive integer",
            ),
            ("grpo.temperature", self.grpo.temperature, self.grpo.temperature > 0, "a positive number"),
            ("grpo.top_p", self.grpo.top_p, 0 < self.grpo.top_p <= 1, "in (0, 1]"),
            (
                "grpo.rewards",
                self.grpo.rewards,
                bool(self.grpo.rewards) and set(self.grpo.rewards) <= set(REWARD_NAMES),
                f"a non-empty mapping of {list(REWARD_NAMES)} to weights",
            ),
            (
                "grpo.scale_rewards",
                self.grpo.scale_rewards,
                self.grpo.scale_rewards in ADVANTAGE_SCALES,
                f"one of {list(ADVANTAGE_SCALES)}",
            ),
            (
                "grpo.aggregation",
                self.grpo.aggregation,
                self.grpo.aggregation in AGGREGATIONS,
                f"one of {list(AGGREGATIONS)}",
            ),
            ("grpo.epsilon_low", self.grpo.epsilon_low, 0 <= self.grpo.epsilon_low < 1, "in [0, 1)"),
            ("grpo.epsilon_high", self.grpo.epsilon_high, self.grpo.epsilon_high >= 0, "a non-negative number"),
            ("grpo.beta", self.grpo.beta, self.grpo.beta >= 0, "a non-negative number"),
            ("grpo.num_iterations", self.grpo.num_iterations, self.grpo.num_iterations > 0, "a positive integer"),
            (
                "grpo.overlong_cache_tokens",
                self.grpo.overlong_cache_tokens,
                0 <= self.grpo.overlong_cache_tokens < self.grpo.max_completion_tokens,
                "0 (off) or fewer than grpo.max_completion_tokens",
            ),
            ("grpo.eval_prompts", self.grpo.eval_prompts, self.grpo.eval_prompts >= 0, "a non-negative integer"),
        ]
        for key, value, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"invalid {key}={value!r}: must be {allowed}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            **{name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS},
        }


SECTIONS = {
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "log": LogSection,
    "sft": SFTSection,
    "grpo": GRPOSection,
    "parallel": ParallelSection,
}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a raw recipe mapping."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"invalid override {item!r}: expected section.key=value, e.g. train.max_steps=100")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in ("model", *SECTIONS):
            raise ConfigError(f"unknown recipe section {section!r} in {item!r}; sections: model, {', '.join(SECTIONS)}")
        target = raw.setdefault(section, {})
        if isinstance(target, str):  # model given as a preset name: overrides extend it
            target = raw[section] = {"preset": target}
        try:
            target[name] = load_yaml(value)  # values are YAML: 16, 3e-4, true, null, [a, b]
        except yaml.YAMLError:
            raise ConfigError(f"invalid override {item!r}: the value is not valid YAML") from None
    return raw


def _build_section(cls: type, values: dict[str, Any], section: str):  # noqa: ANN202
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{section}.{k}' for k in unknown]}; allowed: {sorted(allowed)}")
    return cls(**coerce_fields(cls, values, f"{section}."))


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (or start from defaults), apply overrides, validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} not found")
        try:
            raw = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe is a mapping with sections model, {', '.join(SECTIONS)}")
    raw = apply_overrides(raw, overrides or [])
    unknown = sorted(set(raw) - {"model", *SECTIONS})
    if unknown:
        raise ConfigError(f"unknown recipe section(s) {unknown}; sections: model, {', '.join(SECTIONS)}")
    model_raw = raw.get("model", "tiny")
    if isinstance(model_raw, str):
        model_raw = {"preset": model_raw}
    if not isinstance(model_raw, dict):
        raise ConfigError(f"invalid model={model_raw!r}: must be a preset name or a mapping of model fields")
    model_raw = dict(model_raw)
    preset = model_raw.pop("preset", "tiny")  # explicit fields override the preset they start from
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"invalid model.preset={preset!r}: must be a preset name or a YAML path")
    base = load_config(preset).to_dict() if preset else {}
    known = {f.name for f in fields(ModelConfig)}
    model_raw = coerce_fields(ModelConfig, {k: v for k, v in model_raw.items() if k in known}, "model.") | {
        k: v
        for k, v in model_raw.items()
        if k not in known  # unknown keys: from_dict names them
    }
    model = ModelConfig.from_dict({**base, **model_raw})
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"invalid recipe section {name}={values!r}: must be a mapping of {name}.KEY: value")
        sections[name] = _build_section(cls, values, name)
    recipe = Recipe(model=model, **sections)
    recipe.validate()
    return recipe
