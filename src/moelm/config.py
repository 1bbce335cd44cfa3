"""Model configuration: HF DeepseekV3 field names plus moelm's own router and attention options.

`ModelConfig` describes a network and nothing else. Field names follow transformers' `DeepseekV3Config` so a
`config.json` published for DeepSeek-V3 maps onto it field for field; architecture plain HF cannot represent
(softmax scoring, GQA attention, noisy gating) is moelm-only, saved under its own key in `config.json`. How a
run drives the MoE layers (balancing coefficients, capacity, the bias-update rate, activation checkpointing, the
expert kernel) is `MoEOptions`: a recipe section, never written into a saved model. Constraints are declared on
the fields (`moelm.schema`); every invalid value fails at construction naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml

from moelm.schema import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    ConfigError,
    Constraint,
    Rule,
    Violation,
    above,
    check,
    coerce_fields,
    coerce_value,
    one_of,
    setting,
)

__all__ = ["ConfigError", "ModelConfig", "MoEOptions", "coerce_fields", "coerce_value", "load_config", "load_yaml"]

MOELM_CONFIG_KEY = "moelm"
SCORING_FUNCS = ("sigmoid", "softmax")
ATTENTION_KINDS = ("mla", "gqa")
EXPERT_BACKENDS = ("auto", "grouped_mm", "loop")
ROPE_TYPES = ("default", "yarn")
# The HF architectures a directory may declare: V3 (and its relatives such as Moonlight) and V2 (softmax routing,
# greedy or group-limited-greedy selection, no selection bias).
MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
HIDDEN_ACTS = ("silu",)

CHECKPOINTING_MODES = ("none", "full", "moe")


def moelm_only(default: Any, check: Constraint | None = None) -> Any:
    """A field plain HF DeepseekV3 has no name for: saved under MOELM_CONFIG_KEY in config.json."""
    return setting(default, check=check, moelm_only=True)


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads `3e-3` and `1e2` as numbers.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so the way most people write a
    learning rate (`3e-3`) arrives as the string '3e-3'. YAML 1.2 (and every JSON reader) calls it a number.
    """


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text the way moelm reads recipes, presets and `--set` values (scientific notation included)."""
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506 - a SafeLoader subclass


def _even(value: int) -> bool:
    return value > 0 and value % 2 == 0


# ---------------------------------------------------------------------- cross-field rules of ModelConfig
def _experts_per_token_fit(c: ModelConfig) -> Violation | None:
    if c.num_experts_per_tok > c.n_routed_experts:
        return Violation("num_experts_per_tok", c.num_experts_per_tok, f"at most n_routed_experts={c.n_routed_experts}")
    per_group = c.n_routed_experts // c.n_group
    if c.num_experts_per_tok > c.topk_group * per_group:
        allowed = f"at most topk_group * experts per group = {c.topk_group * per_group}"
        return Violation("num_experts_per_tok", c.num_experts_per_tok, allowed)
    return None


def _groups_divide_experts(c: ModelConfig) -> Violation | None:
    if c.n_routed_experts % c.n_group:
        return Violation("n_routed_experts", c.n_routed_experts, f"a multiple of n_group={c.n_group}")
    if c.topk_group > c.n_group:
        return Violation("topk_group", c.topk_group, f"at most n_group={c.n_group}")
    if c.n_group > 1 and c.n_routed_experts // c.n_group < 2 and c.scoring_func == "sigmoid":
        return Violation("n_group", c.n_group, "a group size of at least 2 experts (group score sums the top-2)")
    return None


def _gqa_heads_fit(c: ModelConfig) -> Violation | None:
    if c.attention != "gqa":
        return None
    if c.head_dim is None and c.hidden_size % c.num_attention_heads:
        return Violation("hidden_size", c.hidden_size, "divisible by num_attention_heads when head_dim is unset")
    if c.gqa_head_dim % 2:
        return Violation("head_dim", c.gqa_head_dim, "an even number (RoPE rotates pairs)")
    if c.num_key_value_heads <= 0 or c.num_attention_heads % c.num_key_value_heads:
        allowed = f"a positive divisor of num_attention_heads={c.num_attention_heads}"
        return Violation("num_key_value_heads", c.num_key_value_heads, allowed)
    return None


def _rope_scaling_known(c: ModelConfig) -> Violation | None:
    if c.rope_scaling is None:
        return None
    rope_type = c.rope_scaling.get("type", c.rope_scaling.get("rope_type"))
    if rope_type not in ROPE_TYPES:
        return Violation("rope_scaling.type", rope_type, f"one of {list(ROPE_TYPES)}")
    factor = c.rope_scaling.get("factor")
    if rope_type == "yarn" and (not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0):
        return Violation("rope_scaling.factor", factor, "a positive number")
    return None


def _dense_layers_fit(c: ModelConfig) -> Violation | None:
    if c.first_k_dense_replace > c.num_hidden_layers:
        return Violation("first_k_dense_replace", c.first_k_dense_replace, f"0..{c.num_hidden_layers}")
    return None


def _token_ids_in_vocab(c: ModelConfig) -> Violation | None:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(c, name)
        if value is not None and not 0 <= value < c.vocab_size:
            return Violation(name, value, f"null or a token id in 0..{c.vocab_size - 1}")
    return None


def _noise_without_groups(c: ModelConfig) -> Violation | None:
    if c.noisy_gating and c.n_group > 1:
        return Violation("noisy_gating", c.noisy_gating, "false when n_group > 1 (noisy top-k is not group-limited)")
    return None


@dataclass
class ModelConfig:
    """A DeepSeek-V3-style MoE decoder's architecture: what a saved config.json needs to rebuild the network.

    Defaults describe a tiny model, presets describe real shapes. How a run trains it (balancing coefficients,
    capacity, checkpointing, the expert kernel) is `MoEOptions`, a recipe section, not part of the model.
    """

    model_type: str = setting("deepseek_v3", check=one_of(*MODEL_TYPES))
    vocab_size: int = setting(1024, check=POSITIVE_INT)
    hidden_size: int = setting(128, check=POSITIVE_INT)
    intermediate_size: int = setting(384, check=POSITIVE_INT)
    moe_intermediate_size: int = setting(96, check=POSITIVE_INT)
    num_hidden_layers: int = setting(4, check=POSITIVE_INT)
    num_attention_heads: int = setting(4, check=POSITIVE_INT)
    num_key_value_heads: int = 4  # GQA only (checked by _gqa_heads_fit)
    n_shared_experts: int = setting(1, check=NON_NEGATIVE_INT)
    n_routed_experts: int = setting(8, check=POSITIVE_INT)
    num_experts_per_tok: int = setting(2, check=POSITIVE_INT)
    n_group: int = setting(1, check=POSITIVE_INT)
    topk_group: int = setting(1, check=POSITIVE_INT)
    routed_scaling_factor: float = setting(1.0, check=POSITIVE)
    norm_topk_prob: bool = True
    first_k_dense_replace: int = setting(1, check=NON_NEGATIVE_INT)
    moe_layer_freq: int = setting(1, check=POSITIVE_INT)
    kv_lora_rank: int = setting(64, check=POSITIVE_INT)
    q_lora_rank: int | None = setting(None, check=above(0, "a positive integer or null (no query compression)"))
    qk_nope_head_dim: int = setting(32, check=NON_NEGATIVE_INT)
    qk_rope_head_dim: int = setting(16, check=Constraint("an even positive integer (RoPE rotates pairs)", _even))
    v_head_dim: int = setting(32, check=POSITIVE_INT)
    hidden_act: str = setting("silu", check=one_of(*HIDDEN_ACTS))
    max_position_embeddings: int = setting(2048, check=POSITIVE_INT)
    rope_theta: float = setting(10000.0, check=POSITIVE)
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = setting(1e-6, check=POSITIVE)
    initializer_range: float = setting(0.02, check=NON_NEGATIVE)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_nextn_predict_layers: int = setting(0, check=NON_NEGATIVE_INT)
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # moelm-only architecture
    scoring_func: str = moelm_only("sigmoid", one_of(*SCORING_FUNCS))
    attention: str = moelm_only("mla", one_of(*ATTENTION_KINDS))
    head_dim: int | None = moelm_only(None, POSITIVE_INT)
    noisy_gating: bool = moelm_only(False)  # Shazeer 2017 learned-noise top-k gating: adds a noise projection

    RULES: ClassVar[tuple[Rule, ...]] = (
        _experts_per_token_fit,
        _groups_divide_experts,
        _gqa_heads_fit,
        _rope_scaling_known,
        _dense_layers_fit,
        _token_ids_in_vocab,
        _noise_without_groups,
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject shapes and options the model cannot build, naming the field and the allowed values."""
        check(self)

    # ------------------------------------------------------------------ derived shapes
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: the position-free part plus the rotary part (MLA)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def gqa_head_dim(self) -> int:
        """Head width for GQA attention: head_dim when set, else hidden_size / num_attention_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        """'yarn' or 'default', whichever spelling (type / rope_type) the source used."""
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: layer i is MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0 (MTP
        blocks count as later layers). transformers ignores moe_layer_freq; every published config has 1."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    # ------------------------------------------------------------------ io
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a flat mapping; unknown keys fail naming them so typos never pass silently."""
        known = {f.name for f in fields(cls)}
        moved = sorted(set(data) & set(RUN_OPTION_FIELDS))
        if moved:
            raise ConfigError(
                f"{moved} are run settings, not architecture: set them in the recipe's moe section "
                f"(moe.{moved[0]}=...) or pass MoEOptions to MoELM"
            )
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; allowed fields: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping of every field (for YAML and for reporting)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Load a YAML preset or recipe; a `model:` section is accepted so recipes can embed the model."""
        try:
            data = load_yaml(Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({_one_line(error)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path) -> None:
        """Write every field to YAML, readable by `from_yaml`."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed (CLI overrides, tests)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Map an HF DeepseekV3 `config.json` (transformers 4.x or 5.x spelling) onto a ModelConfig."""
        return cls.from_hf_dict_with_options(data)[0]

    @classmethod
    def from_hf_dict_with_options(cls, data: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
        """The ModelConfig of a `config.json`, and the run settings an older moelm wrote beside it.

        Directories saved before MoEOptions existed carry balancing, capacity and kernel settings under the
        'moelm' key; they are returned separately so a loader can apply them (with a note) instead of failing.
        """
        model_type = data.get("model_type", "deepseek_v3")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"unsupported model_type={model_type!r}: moelm loads one of {list(MODEL_TYPES)}")
        known = {f.name for f in fields(cls)} - set(MOELM_ONLY_FIELDS)
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        values["model_type"] = model_type
        values.pop("rope_scaling", None)
        rope = data.get("rope_parameters") or data.get("rope_scaling")
        if "rope_parameters" in data and data["rope_parameters"]:
            rope = dict(data["rope_parameters"])
            values["rope_theta"] = rope.pop("rope_theta", data.get("rope_theta", 10000.0))
        if rope:
            rope = dict(rope)
            rope_type = rope.pop("rope_type", rope.pop("type", "default"))
            values["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
        if "num_mtp_layers" in data and "num_nextn_predict_layers" not in data:
            values["num_nextn_predict_layers"] = data["num_mtp_layers"]
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = data.get("num_attention_heads", cls.num_key_value_heads)
        if model_type == "deepseek_v2":
            # V2 scores with softmax and has no selection bias; "greedy" ignores any n_group the file states.
            values["scoring_func"] = "softmax"
            topk_method = data.get("topk_method", "greedy")
            if topk_method not in V2_TOPK_METHODS:
                raise ConfigError(f"invalid topk_method={topk_method!r}: must be one of {list(V2_TOPK_METHODS)}")
            if topk_method == "greedy":
                values["n_group"], values["topk_group"] = 1, 1
        elif data.get("topk_method") == "greedy" and data.get("n_group") is None:
            values["n_group"], values["topk_group"] = 1, 1
        for name in ("n_group", "topk_group"):
            if values.get(name) is None:
                values[name] = 1
        if "scoring_func" in data and MOELM_CONFIG_KEY not in data and model_type == "deepseek_v3":
            values["scoring_func"] = data["scoring_func"]
        extras = dict(data.get(MOELM_CONFIG_KEY) or {})
        legacy = {k: extras.pop(k) for k in list(extras) if k in RUN_OPTION_FIELDS}
        values.update(extras)
        return cls(**values), legacy

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers reads as DeepseekV3Config (or DeepseekV2Config for a V2 model), with
        moelm-only options under 'moelm'."""
        out = {k: v for k, v in self.to_dict().items() if k not in MOELM_ONLY_FIELDS}
        rope_parameters: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters.update({k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_type")})
        out.pop("rope_scaling")
        out.pop("rope_theta")
        out["rope_parameters"] = rope_parameters
        if self.model_type == "deepseek_v2":
            out.pop("num_nextn_predict_layers")
            out.update(
                architectures=["DeepseekV2ForCausalLM"],
                topk_method="group_limited_greedy" if self.n_group > 1 else "greedy",
                scoring_func="softmax",
                torch_dtype="float32",
            )
        else:
            out["num_mtp_layers"] = self.num_nextn_predict_layers
            out.update(
                architectures=["DeepseekV3ForCausalLM"],
                topk_method="noaux_tc",
                scoring_func=self.scoring_func,
                rope_interleave=True,
                torch_dtype="float32",
            )
        out[MOELM_CONFIG_KEY] = {name: getattr(self, name) for name in MOELM_ONLY_FIELDS}
        return out

    def hf_incompatibilities(self) -> list[str]:
        """Options a plain DeepseekV3 model cannot represent; export refuses while this is non-empty."""
        problems = []
        name = "DeepseekV2" if self.model_type == "deepseek_v2" else "DeepseekV3"
        scoring = "softmax" if self.model_type == "deepseek_v2" else "sigmoid"
        if self.scoring_func != scoring:
            problems.append(f"scoring_func={self.scoring_func!r} (HF {name} always routes with {scoring})")
        if self.attention != "mla":
            problems.append(f"attention={self.attention!r} (HF {name} only has MLA attention)")
        if self.moe_layer_freq != 1:
            problems.append(
                f"moe_layer_freq={self.moe_layer_freq} (transformers makes every layer past the dense "
                "ones MoE; DeepSeek's own code and moelm honour it)"
            )
        if self.model_type == "deepseek_v2":
            if self.num_nextn_predict_layers:
                problems.append("num_nextn_predict_layers > 0 (DeepseekV2 has no MTP layers)")
        return problems

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read an HF `config.json`."""
        return cls.from_json_with_options(path)[0]

    @classmethod
    def from_json_with_options(cls, path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
        """Read an HF `config.json`: the config, and the run settings an older moelm stored in it."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found") from None
        except ValueError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields")
        return cls.from_hf_dict_with_options(data)


@dataclass
class MoEOptions:
    """How a run drives the MoE layers: balancing, capacity, activation checkpointing and the expert kernel.

    These change training (or speed), never the network's shape, so they live in the recipe's `moe` section
    and are passed to `MoELM(config, options)`; a saved model directory does not carry them. A coefficient of 0
    turns its mechanism off; all are combinable (references §2).
    """

    expert_backend: str = setting("auto", check=one_of(*EXPERT_BACKENDS))
    activation_checkpointing: str = setting("none", check=one_of(*CHECKPOINTING_MODES))  # full blocks | expert FFNs
    mtp_loss_weight: float = setting(0.3, check=NON_NEGATIVE)  # DeepSeek-V3's lambda on the MTP loss
    aux_loss_alpha: float = setting(0.0, check=NON_NEGATIVE)  # Switch/GShard alpha * E * sum f_i P_i
    seq_aux_loss_alpha: float = setting(0.0, check=NON_NEGATIVE)  # DeepSeek-V3 sequence-wise balance loss
    importance_loss_coef: float = setting(0.0, check=NON_NEGATIVE)  # Shazeer importance loss w * CV^2
    load_loss_coef: float = setting(0.0, check=NON_NEGATIVE)  # Shazeer load loss (needs model.noisy_gating)
    router_z_loss_coef: float = setting(0.0, check=NON_NEGATIVE)  # ST-MoE z-loss
    capacity_factor: float | None = setting(None, check=above(0, "null (dropless) or a positive number"))
    eval_capacity_factor: float | None = setting(None, check=above(0, "null (dropless) or a positive number"))
    bias_update_rate: float = setting(0.0, check=NON_NEGATIVE)  # aux-loss-free balancing gamma, once per step
    bias_update_centered: bool = False  # subtract the mean bias update so the biases do not drift

    def __post_init__(self) -> None:
        check(self)

    def replace(self, **changes: Any) -> MoEOptions:
        return dataclasses.replace(self, **changes)

    def conflicts_with(self, config: ModelConfig) -> Violation | None:
        """A setting the given architecture cannot honour (key relative to this section)."""
        if self.load_loss_coef > 0 and not config.noisy_gating:
            allowed = "0 unless model.noisy_gating is true (the load estimator needs noise)"
            return Violation("load_loss_coef", self.load_loss_coef, allowed)
        if self.bias_update_rate > 0 and config.model_type == "deepseek_v2":
            return Violation("bias_update_rate", self.bias_update_rate, "0 for deepseek_v2 (no selection bias)")
        return None


RUN_OPTION_FIELDS = tuple(f.name for f in fields(MoEOptions))


def options_from_legacy(legacy: dict[str, Any], source: str) -> MoEOptions:
    """MoEOptions from the run settings an older config.json carried, with a note saying they were applied."""
    options = MoEOptions(**coerce_fields(MoEOptions, legacy, "moe."))
    changed = {k: v for k, v in legacy.items() if getattr(MoEOptions(), k) != v}
    if changed:
        print(
            f"note: {source} carries run settings from an older moelm ({changed}); applied as MoEOptions "
            "(a recipe's moe section sets them now)",
            file=sys.stderr,
        )
    return options


# Fields that only moelm understands, from their metadata; HF export writes them under MOELM_CONFIG_KEY.
MOELM_ONLY_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.metadata.get("moelm_only"))


def _one_line(error: Exception) -> str:
    """A YAML parser message (several lines with a caret) folded into one line."""
    return " ".join(str(error).split())


def preset_names() -> list[str]:
    """Names of the model presets shipped with the package (moelm/configs/*.yaml)."""
    root = resources.files("moelm") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | Path) -> ModelConfig:
    """Resolve a preset name, a YAML file, an HF `config.json` or a model directory to a ModelConfig."""
    path = Path(name_or_path)
    if path.is_dir():
        return ModelConfig.from_json(path / "config.json")
    if path.is_file():
        return ModelConfig.from_json(path) if path.suffix == ".json" else ModelConfig.from_yaml(path)
    name = str(name_or_path)
    if name in preset_names():
        with resources.as_file(resources.files("moelm") / "configs" / f"{name}.yaml") as preset:
            return ModelConfig.from_yaml(preset)
    raise ConfigError(f"{name_or_path!r} is neither a file, a model directory nor a preset; presets: {preset_names()}")
