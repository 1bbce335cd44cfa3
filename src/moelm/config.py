"""Model configuration: HF DeepseekV3 field names plus moelm's own router and attention options.

One dataclass describes a model. Field names follow transformers' `DeepseekV3Config` so a `config.json`
published for DeepSeek-V3 maps onto it field for field; options plain HF cannot represent (softmax scoring,
GQA attention, the expert backend) are moelm-only fields, saved under their own key in `config.json`.
Every invalid value fails at construction with a `ConfigError` naming the field, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

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


def moelm_only(default: Any) -> Any:
    """A field plain HF DeepseekV3 has no name for: saved under MOELM_CONFIG_KEY in config.json."""
    return dataclasses.field(default=default, metadata={"moelm_only": True})


class ConfigError(ValueError):
    """An invalid configuration value: the message names the field, the value and what is allowed."""


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


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "any value"}
    if hint in names:
        return names[hint]
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def coerce_value(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint, naming `key` when it does not fit.

    Integers given as integral floats (`1e2`) become ints and ints become floats where a float is expected;
    fractions for integer fields, strings for numbers, numbers for strings and so on are rejected up front, so a
    wrong type never reaches the code that would crash on it.
    """
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return coerce_value(key, value, option)
            except ConfigError:
                continue
        _fail(key, value, _type_name(hint))
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, float):
            _fail(key, value, "an integer (no fraction)")
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [coerce_value(f"{key}[{i}]", item, args[0]) if args else item for i, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            item_hint = args[1] if len(args) == 2 else Any
            return {k: coerce_value(f"{key}.{k}", v, item_hint) for k, v in value.items()}
    else:
        return value
    _fail(key, value, _type_name(hint))
    return None  # unreachable: _fail raises


def coerce_fields(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`values` (a mapping of a dataclass's fields) with every value checked and coerced to its field's type."""
    hints = get_type_hints(cls, vars(typing))
    return {
        name: coerce_value(prefix + name, value, hints[name]) if name in hints else value
        for name, value in values.items()
    }


@dataclass
class ModelConfig:
    """A DeepSeek-V3-style MoE decoder; defaults describe a tiny model, presets describe real shapes."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    moe_intermediate_size: int = 96
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    kv_lora_rank: int = 64
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # moelm-only options
    scoring_func: str = moelm_only("sigmoid")
    attention: str = moelm_only("mla")
    head_dim: int | None = moelm_only(None)
    expert_backend: str = moelm_only("auto")
    mtp_loss_weight: float = moelm_only(0.3)
    # load balancing (references §2); a coefficient of 0 turns that mechanism off, all are combinable
    aux_loss_alpha: float = moelm_only(
        0.0
    )  # Switch/GShard loss alpha * E * sum f_i P_i, per layer, averaged over layers
    seq_aux_loss_alpha: float = moelm_only(0.0)  # DeepSeek-V3 complementary sequence-wise balance loss
    noisy_gating: bool = moelm_only(False)  # Shazeer 2017 learned-noise top-k gating (noise only in training)
    importance_loss_coef: float = moelm_only(0.0)  # Shazeer importance loss w * CV(importance)^2
    load_loss_coef: float = moelm_only(0.0)  # Shazeer load loss w * CV(smooth load)^2 (needs noisy_gating)
    router_z_loss_coef: float = moelm_only(0.0)  # ST-MoE z-loss: mean logsumexp(logits)^2
    capacity_factor: float | None = moelm_only(None)  # training capacity; None = dropless
    eval_capacity_factor: float | None = moelm_only(None)  # capacity in eval mode; None = dropless
    bias_update_rate: float = moelm_only(0.0)  # aux-loss-free balancing gamma (applied by BiasBalancer once per step)
    bias_update_centered: bool = moelm_only(False)  # subtract the mean bias update so the biases do not drift
    activation_checkpointing: str = moelm_only("none")  # none | full (whole blocks) | moe (expert FFNs only)

    def __post_init__(self) -> None:
        for name, value in coerce_fields(ModelConfig, self.__dict__).items():
            setattr(self, name, value)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Reject shapes and options the model cannot build, naming the field and the allowed values."""
        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
            "moe_layer_freq",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "a positive integer")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers", "qk_nope_head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, value, "a non-negative integer")
        _choice("model_type", self.model_type, MODEL_TYPES)
        _choice("scoring_func", self.scoring_func, SCORING_FUNCS)
        _choice("attention", self.attention, ATTENTION_KINDS)
        _choice("expert_backend", self.expert_backend, EXPERT_BACKENDS)
        _choice("hidden_act", self.hidden_act, HIDDEN_ACTS)
        if self.num_experts_per_tok > self.n_routed_experts:
            _fail(
                "num_experts_per_tok",
                self.num_experts_per_tok,
                f"at most n_routed_experts={self.n_routed_experts}",
            )
        if self.n_routed_experts % self.n_group:
            _fail("n_routed_experts", self.n_routed_experts, f"a multiple of n_group={self.n_group}")
        if self.topk_group > self.n_group:
            _fail("topk_group", self.topk_group, f"at most n_group={self.n_group}")
        experts_per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and experts_per_group < 2 and self.scoring_func == "sigmoid":
            _fail("n_group", self.n_group, "a group size of at least 2 experts (group score sums the top-2)")
        if self.num_experts_per_tok > self.topk_group * experts_per_group:
            _fail(
                "num_experts_per_tok",
                self.num_experts_per_tok,
                f"at most topk_group * experts per group = {self.topk_group * experts_per_group}",
            )
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            _fail("q_lora_rank", self.q_lora_rank, "a positive integer or null (no query compression)")
        if self.qk_rope_head_dim % 2:
            _fail("qk_rope_head_dim", self.qk_rope_head_dim, "an even number (RoPE rotates pairs)")
        if self.attention == "gqa":
            head_dim = self.gqa_head_dim
            if self.head_dim is None and self.hidden_size % self.num_attention_heads:
                _fail("hidden_size", self.hidden_size, "divisible by num_attention_heads when head_dim is unset")
            if head_dim % 2:
                _fail("head_dim", head_dim, "an even number (RoPE rotates pairs)")
            if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
                _fail(
                    "num_key_value_heads",
                    self.num_key_value_heads,
                    f"a positive divisor of num_attention_heads={self.num_attention_heads}",
                )
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                _fail("rope_scaling", self.rope_scaling, "a mapping such as {type: yarn, factor: 40, ...}")
            rope_type = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            _choice("rope_scaling.type", rope_type, ROPE_TYPES)
            if rope_type == "yarn":
                factor = self.rope_scaling.get("factor")
                if not isinstance(factor, (int, float)) or factor <= 0:
                    _fail("rope_scaling.factor", factor, "a positive number")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            _fail("first_k_dense_replace", self.first_k_dense_replace, f"0..{self.num_hidden_layers}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                _fail(name, value, f"null or a token id in 0..{self.vocab_size - 1}")
        if self.routed_scaling_factor <= 0:
            _fail("routed_scaling_factor", self.routed_scaling_factor, "a positive number")
        for name in (
            "mtp_loss_weight",
            "aux_loss_alpha",
            "seq_aux_loss_alpha",
            "importance_loss_coef",
            "load_loss_coef",
            "router_z_loss_coef",
            "bias_update_rate",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                _fail(name, value, "a non-negative number")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                _fail(name, value, "null (dropless) or a positive number such as 1.25")
        _choice("activation_checkpointing", self.activation_checkpointing, CHECKPOINTING_MODES)
        if self.load_loss_coef > 0 and not self.noisy_gating:
            _fail(
                "load_loss_coef", self.load_loss_coef, "0 unless noisy_gating is true (the load estimator needs noise)"
            )
        if self.noisy_gating and self.n_group > 1:
            _fail("noisy_gating", self.noisy_gating, "false when n_group > 1 (noisy top-k is not group-limited)")

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
        values.update(data.get(MOELM_CONFIG_KEY) or {})
        return cls(**values)

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
            if self.bias_update_rate > 0:
                problems.append("bias_update_rate > 0 (DeepseekV2 has no e_score_correction_bias to store it in)")
            if self.num_nextn_predict_layers:
                problems.append("num_nextn_predict_layers > 0 (DeepseekV2 has no MTP layers)")
        return problems

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read an HF `config.json`."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found") from None
        except ValueError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of config fields")
        return cls.from_hf_dict(data)


def check_values(owner: object, checks: list[tuple[str, bool, str]], prefix: str = "") -> None:
    """The one validation helper: raise ConfigError for the first (field, ok, allowed) check that failed,
    naming `prefix + field`, the owner's value of it and what is allowed."""
    for name, ok, allowed in checks:
        if not ok:
            _fail(prefix + name, getattr(owner, name), allowed)


# Fields that only moelm understands, from their metadata; HF export writes them under MOELM_CONFIG_KEY.
MOELM_ONLY_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.metadata.get("moelm_only"))


def _one_line(error: Exception) -> str:
    """A YAML parser message (several lines with a caret) folded into one line."""
    return " ".join(str(error).split())


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"invalid {name}={value!r}: must be {allowed}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(name, value, f"one of {list(allowed)}")


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
