"""Training recipes: YAML with sections model, moe, data, optim, train, log, sft, grpo, parallel, lora.

Every key is a declared setting (`moelm.schema`): its type and constraint live on the field, cross-field rules are
small named functions, and one function checks them all, so unknown keys and invalid values fail before anything
runs, naming the key. Recipes compose in Python (`recipe.replace(train={"max_steps": 10})`) and on the command
line (`--set train.max_steps=10`); `to_dict` is the resolved recipe recorded with every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from moelm.config import RUN_OPTION_FIELDS, ConfigError, ModelConfig, MoEOptions, load_config, load_yaml
from moelm.data.source_specs import GRPO_FORMATS, SFT_FORMATS, BuiltinSource, SourceSpec, parse_sources
from moelm.data.tokenizer import MIN_VOCAB_SIZE
from moelm.model.lora import DEFAULT_TARGETS as DEFAULT_LORA_TARGETS
from moelm.model.lora import TARGETS as LORA_TARGETS
from moelm.model.lora import LoraSpec
from moelm.schema import (
    DEVICE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Constraint,
    Rule,
    Violation,
    above,
    at_least,
    build,
    check,
    coerce_fields,
    interval,
    keys_under,
    one_of,
    setting,
    to_plain,
)
from moelm.train.curriculum import PACINGS
from moelm.train.grpo_loss import ADVANTAGE_SCALES, AGGREGATIONS, IMPORTANCE_LEVELS

REWARD_NAMES = ("accuracy", "format", "tag_count", "code")
UNIT = interval(0, 1)
UNIT_OPEN_HIGH = interval(0, 1, high_open=True)
UNIT_OPEN_LOW = interval(0, 1, low_open=True)


@dataclass
class DataSection:
    source: str = "builtin"  # 'builtin', a .jsonl file, a .txt file or a folder of .txt files
    text_field: str = "text"
    builtin_records: int = setting(4000, check=POSITIVE_INT)
    tokenizer: str | None = None  # tokenizer.json to use; None = train a byte-level BPE on the corpus
    vocab_size: int = setting(2048, check=at_least(MIN_VOCAB_SIZE, f"at least {MIN_VOCAB_SIZE} (256 bytes + specials)"))
    seq_len: int = setting(256, check=at_least(2, "an integer >= 2"))
    val_fraction: float = setting(0.05, check=UNIT_OPEN_HIGH)
    fim_rate: float = setting(0.0, check=UNIT)  # share of documents rewritten fill-in-the-middle; DeepSeek uses 0.1
    # Each digit its own pre-token before BPE (LLaMA's choice): numbers become digit sequences, so arithmetic is
    # learned per digit instead of per memorised multi-digit token.
    split_digits: bool = False


@dataclass
class OptimSection:
    lr: float = setting(3e-3, check=POSITIVE)
    min_lr_ratio: float = setting(0.1, check=UNIT)
    weight_decay: float = setting(0.1, check=NON_NEGATIVE)
    beta1: float = setting(0.9, check=UNIT_OPEN_HIGH)
    beta2: float = setting(0.95, check=UNIT_OPEN_HIGH)
    warmup_steps: int = setting(20, check=NON_NEGATIVE_INT)
    schedule: str = setting("cosine", check=one_of("cosine", "wsd"))  # wsd: warmup-stable-decay
    decay_fraction: float = setting(0.2, check=UNIT)  # wsd: share of steps spent decaying
    grad_clip: float = setting(1.0, check=POSITIVE)


@dataclass
class TrainSection:
    max_steps: int = setting(300, check=POSITIVE_INT)
    batch_size: int = setting(8, check=POSITIVE_INT)
    grad_accum: int = setting(1, check=POSITIVE_INT)
    seed: int = 0
    save_every: int = setting(100, check=POSITIVE_INT)
    keep_last: int = setting(2, check=POSITIVE_INT)
    eval_every: int = setting(100, check=POSITIVE_INT)
    eval_batches: int = setting(4, check=POSITIVE_INT)
    log_every: int = setting(10, check=POSITIVE_INT)
    max_skipped: int = setting(5, check=POSITIVE_INT)
    dtype: str = setting("float32", check=one_of("float32", "bfloat16"))  # bf16 autocast; weights stay float32
    device: str = setting("auto", check=DEVICE)  # auto (CUDA when available); under torchrun cuda:LOCAL_RANK
    compile: bool = False  # torch.compile the model for training
    # Packed documents' mask: auto = flex_attention on CUDA, SDPA with a boolean mask elsewhere (flex has no CPU
    # backward in torch 2.13); sdpa or flex force one.
    attention: str = setting("auto", check=one_of("auto", "sdpa", "flex"))
    reuse_freed_memory: bool = True  # glibc: keep freed step buffers for reuse (moelm.train.allocator)


@dataclass
class ParallelSection:
    """Multi-process training under torchrun; ignored (one process, no process group) without it."""

    expert_degree: int = setting(1, check=POSITIVE_INT)  # ranks one expert layer is spread over; divides experts
    pipeline_degree: int = setting(1, check=POSITIVE_INT)  # pipeline stages' ranks (pre-training); divides the world
    pipeline_schedule: str = setting("1f1b", check=one_of("1f1b", "interleaved_1f1b", "dualpipev"))
    virtual_stages: int = setting(2, check=POSITIVE_INT)  # stages per rank under interleaved_1f1b
    fsdp: bool | None = None  # shard parameters, gradients and optimizer state; default: on when world > 1
    reshard_after_forward: bool = True  # free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2)
    backend: str | None = setting(None, check=one_of("gloo", "nccl"))  # default: nccl on CUDA, gloo on CPU
    timeout_s: float = setting(300.0, check=POSITIVE)  # a collective that waits longer fails every rank
    global_balance_loss: bool = False  # aux losses on expert counts all-reduced over ranks (else per micro-batch)


@dataclass
class LogSection:
    sample_prompts: list[str] = field(default_factory=lambda: ["Question: What is 12 + 7?\nAnswer:", "def add_3(x):"])
    sample_tokens: int = setting(32, check=NON_NEGATIVE_INT)
    progress: bool = True


def _sft_default_sources() -> list[SourceSpec]:
    return [BuiltinSource(num_records=4000, domains=["math"])]


def _grpo_default_sources() -> list[SourceSpec]:
    return [BuiltinSource(num_records=2000, seed=2, domains=["math"], max_difficulty=1)]


@dataclass
class SFTSection:
    """Fine-tuning data: sources with mixture weights, difficulty, curriculum pacing, batching."""

    # Typed specs (moelm.data.source_specs): builtin (num_records, seed, domains, max_difficulty) or a file format
    # with a path; each may carry a mixture weight and a task name.
    sources: list[SourceSpec] = field(default_factory=_sft_default_sources)
    mixture_temperature: float = setting(1.0, check=POSITIVE)  # without weights: task probability ∝ size^(1/T)
    strict: bool = False  # malformed records: skipped and reported (False) or fatal (True)
    difficulty: str = setting("source", check=one_of("source", "length", "loss"))  # loss: under the base model
    pacing: str = setting("none", check=one_of(*PACINGS))
    pacing_start: float = setting(0.2, check=UNIT_OPEN_LOW)  # fraction of each task unlocked at the start
    pacing_full_at: float = setting(0.8, check=UNIT_OPEN_LOW)  # training progress at which everything is unlocked
    pacing_steps: int = setting(4, check=POSITIVE_INT)  # buckets for the step pacing
    anti_curriculum: bool = False  # hardest first (ablation)
    batching: str = setting("pack", check=one_of("pack", "pad"))  # see benchmarks/sft_batching.py
    bucket_batches: int = setting(8, check=POSITIVE_INT)  # pad: batches drawn together and sorted by length
    val_examples: int = setting(64, check=NON_NEGATIVE_INT)  # held-out examples per task (never trained on)
    eval_exact_match: bool = True  # greedy exact match on held-out examples with answers, at every eval
    max_new_tokens: int = setting(48, check=POSITIVE_INT)

    SOURCE_FORMATS: ClassVar[tuple[str, ...]] = SFT_FORMATS
    BUILTIN_DEFAULTS: ClassVar[dict[str, Any]] = {}


def _overlong_inside_limit(g: GRPOSection) -> Violation | None:
    if g.overlong_cache_tokens >= g.max_completion_tokens:
        return Violation(
            "overlong_cache_tokens", g.overlong_cache_tokens, "0 (off) or fewer than grpo.max_completion_tokens"
        )
    return None


REWARDS = Constraint(
    f"a non-empty mapping of {list(REWARD_NAMES)} to weights", lambda v: bool(v) and set(v) <= set(REWARD_NAMES)
)


@dataclass
class GRPOSection:
    """Reinforcement learning with verifiable rewards: prompts, rollouts, rewards and the GRPO objective."""

    # Prompt sources: builtin, or jsonl records with prompt and answer (and optional tests: assert lines).
    sources: list[SourceSpec] = field(default_factory=_grpo_default_sources)
    chat_template: bool = True  # ask through the model's chat template (R1 format) or with the plain prompt
    num_generations: int = setting(4, check=at_least(2, "an integer >= 2"))  # G completions per prompt
    max_completion_tokens: int = setting(32, check=POSITIVE_INT)
    temperature: float = setting(1.0, check=POSITIVE)
    top_p: float = setting(1.0, check=UNIT_OPEN_LOW)
    rewards: dict[str, float] = setting(factory=lambda: {"accuracy": 1.0, "format": 0.1}, check=REWARDS)
    overlong_cache_tokens: int = setting(0, check=NON_NEGATIVE_INT)  # DAPO soft overlong penalty window
    scale_rewards: str = setting("group", check=one_of(*ADVANTAGE_SCALES))  # none = Dr. GRPO
    aggregation: str = setting("grpo", check=one_of(*AGGREGATIONS))  # TRL's loss_type
    importance_sampling_level: str = setting("token", check=one_of(*IMPORTANCE_LEVELS))  # sequence = GSPO
    epsilon_low: float = setting(0.2, check=UNIT_OPEN_HIGH)
    epsilon_high: float = setting(0.28, check=NON_NEGATIVE)
    delta: float | None = setting(None, check=above(1, "null (off) or a number > 1 (TRL suggests > 1 + epsilon_high)"))
    use_bias_correction_kl: bool = True  # TRL's default: the k3 KL term times the importance ratio
    beta: float = setting(0.0, check=NON_NEGATIVE)  # > 0: k3 KL to the frozen base model
    num_iterations: int = setting(1, check=POSITIVE_INT)  # updates per rollout batch (mu)
    mask_truncated: bool = False  # drop completions that hit max_completion_tokens from the loss
    eval_prompts: int = setting(32, check=NON_NEGATIVE_INT)  # held-out prompts scored greedily at every evaluation
    # What makes the gradient non-zero: DAPO's dynamic sampling drops groups whose rewards are all equal and draws
    # more prompts, at most max_sampling_rounds rounds per micro-batch (then tops up with dropped groups).
    dynamic_sampling: bool = False
    max_sampling_rounds: int = setting(4, check=POSITIVE_INT)
    difficulty_sampling: bool = False  # prefer prompts whose observed pass rate lies inside (0, 1)
    curriculum: bool = False  # draw the easiest difficulty levels first; open the next at curriculum_unlock_at
    curriculum_unlock_at: float = setting(0.6, check=UNIT_OPEN_LOW)
    # MoE under RL: log how often the training forward routes a completion token to other experts than the
    # rollout did (costs one no-grad forward per rollout), and optionally reuse the rollout's experts.
    routing_drift: bool = False
    routing_replay: bool = False
    # Rollouts decode through the compiled step (built once per batch and cache bucket, then kept on disk; the
    # packages read the policy's weights in place, so optimizer steps need no rebuild). One process only: a
    # model sharded over processes decodes eagerly.
    compile_rollouts: bool = False

    SOURCE_FORMATS: ClassVar[tuple[str, ...]] = GRPO_FORMATS
    BUILTIN_DEFAULTS: ClassVar[dict[str, Any]] = {"seed": 2}  # not the SFT draw (seed 0/1) unless asked
    RULES: ClassVar[tuple[Rule, ...]] = (_overlong_inside_limit,)


LORA_TARGETS_ALLOWED = Constraint(
    f"a non-empty list of {list(LORA_TARGETS)}", lambda v: bool(v) and set(v) <= set(LORA_TARGETS)
)


@dataclass
class LoraSection:
    """Low-rank adapters for `moelm sft` / `moelm grpo` (moelm.model.lora): the base weights stay frozen, only
    the adapters train, checkpoints and the result hold the adapters alone, in PEFT's directory format."""

    rank: int = setting(0, check=NON_NEGATIVE_INT)  # 0: off (full fine-tuning)
    alpha: float | None = setting(None, check=POSITIVE)  # scaling alpha / rank; null: alpha = rank (scaling 1)
    dropout: float = setting(0.0, check=UNIT_OPEN_HIGH)  # on each adapter's input, training only
    targets: list[str] = setting(factory=lambda: list(DEFAULT_LORA_TARGETS), check=LORA_TARGETS_ALLOWED)

    def spec(self) -> LoraSpec | None:
        """The adapters to attach, or None when LoRA is off."""
        if self.rank == 0:
            return None
        alpha = self.alpha if self.alpha is not None else float(self.rank)
        return LoraSpec(rank=self.rank, alpha=alpha, dropout=self.dropout, targets=tuple(self.targets))


# ---------------------------------------------------------------------- rules across sections
def _sequence_fits_positions(r: Recipe) -> Violation | None:
    limit = r.model.max_position_embeddings
    if r.data.seq_len > limit:
        return Violation("data.seq_len", r.data.seq_len, f"2..model.max_position_embeddings={limit}")
    return None


def _expert_degree_divides_experts(r: Recipe) -> Violation | None:
    experts = r.model.n_routed_experts
    if experts % r.parallel.expert_degree:
        return Violation(
            "parallel.expert_degree", r.parallel.expert_degree, f"a divisor of model.n_routed_experts={experts}"
        )
    return None


def _moe_options_fit_model(r: Recipe) -> Violation | None:
    broken = r.moe.conflicts_with(r.model)
    return None if broken is None else Violation(f"moe.{broken.key}", broken.value, broken.allowed)


SECTIONS: dict[str, type] = {
    "moe": MoEOptions,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "log": LogSection,
    "sft": SFTSection,
    "grpo": GRPOSection,
    "parallel": ParallelSection,
    "lora": LoraSection,
}


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=lambda: load_config("tiny"))
    moe: MoEOptions = field(default_factory=MoEOptions)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)
    sft: SFTSection = field(default_factory=SFTSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: LoraSection = field(default_factory=LoraSection)

    RULES: ClassVar[tuple[Rule, ...]] = (
        _sequence_fits_positions,
        _expert_degree_divides_experts,
        _moe_options_fit_model,
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every section's fields, then the rules that span sections; the first failure names its key."""
        for name in SECTIONS:
            section = getattr(self, name)
            if hasattr(section, "SOURCE_FORMATS"):
                section.sources = parse_sources(
                    section.sources, f"{name}.sources", section.SOURCE_FORMATS, section.BUILTIN_DEFAULTS
                )
            check(section, f"{name}.")
        self.model.validate()
        for rule in self.RULES:
            broken = rule(self)
            if broken is not None:
                raise ConfigError(f"invalid {broken.key}={broken.value!r}: must be {broken.allowed}")

    def replace(self, **changes: Any) -> Recipe:
        """A validated copy with sections changed: each keyword names a section and gives a section object or a
        mapping of the keys to change, e.g. `recipe.replace(train={"max_steps": 10}, model={"n_group": 2})`."""
        updated = {}
        for name, change in changes.items():
            if name not in ("model", *SECTIONS):
                raise ConfigError(f"unknown recipe section {name!r}; sections: model, {', '.join(SECTIONS)}")
            current = getattr(self, name)
            if isinstance(change, dict):
                merged = {**{f.name: getattr(current, f.name) for f in fields(current)}, **change}
                change = _build_model(merged) if name == "model" else _build_section(name, merged)
            updated[name] = change
        return dataclasses.replace(self, **updated)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain values: what `recipe_from_dict` (and a YAML recipe file) reads back."""
        return {"model": self.model.to_dict(), **{name: to_plain(getattr(self, name)) for name in SECTIONS}}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


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


def _build_section(name: str, values: dict[str, Any]) -> Any:
    """One recipe section from its mapping; sources lists become typed specs first."""
    cls = SECTIONS[name]
    values = dict(values)
    if "sources" in values and hasattr(cls, "SOURCE_FORMATS"):
        values["sources"] = parse_sources(
            values["sources"], f"{name}.sources", cls.SOURCE_FORMATS, cls.BUILTIN_DEFAULTS
        )
    return build(cls, values, f"{name}.")


def _build_model(model_raw: Any) -> ModelConfig:
    """The model section: a preset name, or a mapping of fields (starting from `preset`, default tiny)."""
    if isinstance(model_raw, str):
        model_raw = {"preset": model_raw}
    if not isinstance(model_raw, dict):
        raise ConfigError(f"invalid model={model_raw!r}: must be a preset name or a mapping of model fields")
    model_raw = dict(model_raw)
    moved = sorted(set(model_raw) & set(RUN_OPTION_FIELDS))
    if moved:
        raise ConfigError(
            f"model.{moved[0]} is a run setting, not architecture: write it as moe.{moved[0]} "
            f"(moved to the moe section: {', '.join(moved)})"
        )
    preset = model_raw.pop("preset", "tiny")  # explicit fields override the preset they start from
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"invalid model.preset={preset!r}: must be a preset name or a YAML path")
    base = load_config(preset).to_dict() if preset else {}
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(model_raw) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {['model.' + k for k in unknown]}; allowed: {sorted(known)}")
    model_raw = coerce_fields(ModelConfig, model_raw, "model.")
    with keys_under("model."):  # name the recipe key, not the bare field
        return ModelConfig.from_dict({**base, **model_raw})


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """A Recipe from a mapping of sections (a YAML recipe, a recorded recipe.json), every key checked."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a recipe is a mapping with sections model, {', '.join(SECTIONS)}")
    unknown = sorted(set(raw) - {"model", *SECTIONS})
    if unknown:
        raise ConfigError(f"unknown recipe section(s) {unknown}; sections: model, {', '.join(SECTIONS)}")
    sections = {}
    for name in SECTIONS:
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"invalid recipe section {name}={values!r}: must be a mapping of {name}.KEY: value")
        sections[name] = _build_section(name, values)
    return Recipe(model=_build_model(raw.get("model", "tiny")), **sections)


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
    return recipe_from_dict(apply_overrides(raw, overrides or []))
