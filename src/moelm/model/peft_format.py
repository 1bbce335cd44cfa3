"""LoRA adapters as PEFT directories: `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained` puts onto transformers' `DeepseekV3ForCausalLM`.

Names follow what PEFT 0.21 builds on transformers 5's DeepseekV3:
- attention projections are `target_modules` (`...self_attn.q_proj.lora_A.weight`, [r, in]; `lora_B`, [out, r]);
- routed experts are `target_parameters` on the fused banks. PEFT nests the two wrappers, gate_up_proj inside
  down_proj, so gate_up's factors sit under `experts.base_layer.` and down's under `experts.`; A is [E·r, in] with
  expert-major rows and B is [out, r·E] with rank-major columns (PEFT reshapes B to [out, r, E]);
- shared and dense SwiGLUs are `target_parameters` on their `.weight`s. PEFT on transformers 5 rewrites the bare
  module names gate_proj / up_proj / down_proj into the routed experts' fused banks (its v4-to-v5 MoE
  conversion), which would drop the shared experts, so they are named as parameters, which it leaves alone.
PEFT refuses `lora_dropout` with `target_parameters`; dropout is a training setting, so files record 0.

A directory moelm writes also holds the base model's tokenizer and chat template, so `--model ADAPTER_DIR` runs
like a model directory (the base is read from `base_model_name_or_path`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moelm.files import atomic_path, atomic_write_text
from moelm.model.experts import RoutedExperts
from moelm.model.lora import LoraSpec, adapted_modules, attach_lora, load_lora_state_dict, merge_lora, target_of

if TYPE_CHECKING:
    from moelm.model.transformer import MoELM

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the PEFT release these files were checked against (tests/test_lora.py)
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SHARED_PARAMETERS = [f"mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")]
DENSE_PARAMETERS = [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
# the target kinds PEFT names by parameter, and those parameters (attention is by module name)
PARAMETER_TARGETS = {"experts": EXPERT_PARAMETERS, "shared_experts": SHARED_PARAMETERS, "dense_mlp": DENSE_PARAMETERS}


class AdapterError(ValueError):
    """An adapter directory that cannot be read or does not fit its base model: names the file and key."""


def is_adapter_dir(path: str | Path) -> bool:
    """A PEFT adapter directory (adapter_config.json and no config.json of its own)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- names
Pack = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _peft_layout(name: str, module: torch.nn.Module) -> tuple[dict[str, Callable], Pack]:
    """For one adapted module, (to_peft, from_peft): to_peft maps each PEFT key to a function of our adapter's
    tensors that cuts that key's tensor from them; from_peft rebuilds our adapter's tensors from PEFT's."""
    hf = f"{PEFT_PREFIX}model.{name}"
    if isinstance(module, RoutedExperts):
        num = module.num_experts

        def a_to(a: torch.Tensor) -> torch.Tensor:  # [E, r, in] -> [E·r, in]
            return a.reshape(-1, a.shape[-1])

        def b_to(b: torch.Tensor) -> torch.Tensor:  # [E, out, r] -> [out, r·E]
            return b.permute(1, 2, 0).reshape(b.shape[1], -1)

        def a_from(a: torch.Tensor) -> torch.Tensor:
            return a.reshape(num, -1, a.shape[-1])

        def b_from(b: torch.Tensor) -> torch.Tensor:
            return b.reshape(b.shape[0], -1, num).permute(2, 0, 1)

        to_peft = {
            f"{hf}.base_layer.lora_A.weight": lambda t: a_to(t["gate_up_A"]),
            f"{hf}.base_layer.lora_B.weight": lambda t: b_to(t["gate_up_B"]),
            f"{hf}.lora_A.weight": lambda t: a_to(t["down_A"]),
            f"{hf}.lora_B.weight": lambda t: b_to(t["down_B"]),
        }

        def from_peft(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {
                "gate_up_A": a_from(p[f"{hf}.base_layer.lora_A.weight"]),
                "gate_up_B": b_from(p[f"{hf}.base_layer.lora_B.weight"]),
                "down_A": a_from(p[f"{hf}.lora_A.weight"]),
                "down_B": b_from(p[f"{hf}.lora_B.weight"]),
            }

        return to_peft, from_peft
    if name.endswith("gate_up_proj"):  # a fused SwiGLU: HF's separate gate_proj (part 0) and up_proj (part 1)
        base = hf.removesuffix("gate_up_proj")
        halves = [f"{base}gate_proj", f"{base}up_proj"]
    else:
        halves = [hf]
    to_peft = {}
    for part, key in enumerate(halves):
        to_peft[f"{key}.lora_A.weight"] = lambda t, part=part: t["lora_A"][part]
        to_peft[f"{key}.lora_B.weight"] = lambda t, part=part: t["lora_B"][part]

    def from_peft(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            "lora_A": torch.stack([p[f"{key}.lora_A.weight"] for key in halves]),
            "lora_B": torch.stack([p[f"{key}.lora_B.weight"] for key in halves]),
        }

    return to_peft, from_peft


def _layouts(model: MoELM) -> Iterator[tuple[str, torch.nn.Module, dict[str, Callable], Pack]]:
    for name, module in adapted_modules(model):
        yield (name, module, *_peft_layout(name, module))


def peft_state_dict(model: MoELM) -> dict[str, torch.Tensor]:
    """The attached adapters under PEFT's key names and shapes."""
    out = {}
    for _, module, to_peft, _ in _layouts(model):
        ours = {k: v.detach() for k, v in module.adapter.state_dict().items()}
        for key, take in to_peft.items():
            out[key] = take(ours).contiguous()
    return out


def peft_config(model: MoELM, spec: LoraSpec, base_model: str | None) -> dict:
    """adapter_config.json for the attached adapters (the fields PEFT's LoraConfig reads; defaults elsewhere).
    Targets come from the layers that carry adapters, so a target kind the model lacks (no shared experts, no
    dense layer) is never named."""
    kinds = {target_of(name) for name, _ in adapted_modules(model)}
    modules = sorted({name.rsplit(".", 1)[-1] for name, _ in adapted_modules(model) if target_of(name) == "attention"})
    parameters = [name for kind, names in PARAMETER_TARGETS.items() if kind in kinds for name in names]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "target_parameters": parameters,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "peft_version": PEFT_VERSION,
    }


def save_adapter(model: MoELM, spec: LoraSpec, path: str | Path, base_model: str | Path | None) -> None:
    """Write the attached adapters as a PEFT directory (weights first, config last, each file atomically)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = peft_state_dict(model)
    if not tensors:
        raise AdapterError("the model carries no LoRA adapters to save")
    with atomic_path(path / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    base = str(Path(base_model).resolve()) if base_model is not None else None
    atomic_write_text(path / ADAPTER_CONFIG, json.dumps(peft_config(model, spec, base), indent=2))


# ---------------------------------------------------------------------------------------------- read
def read_adapter_config(path: str | Path) -> tuple[LoraSpec, dict]:
    """The adapter's LoraSpec and its raw config; what moelm cannot apply is an AdapterError naming the key."""
    file = Path(path) / ADAPTER_CONFIG
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{file} is missing") from None
    except ValueError as error:
        raise AdapterError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise AdapterError(
            f"{file}: peft_type must be 'LORA', got {raw.get('peft_type') if isinstance(raw, dict) else raw!r}"
        )
    for key, plain in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if raw.get(key, plain) != plain:
            raise AdapterError(f"{file}: {key}={raw[key]!r} is not supported (moelm reads plain LoRA: {key}={plain!r})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if raw.get(key):
            raise AdapterError(f"{file}: {key} is not supported (one rank and alpha for every adapted layer)")
    rank, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"{file}: r must be a positive integer and lora_alpha a number (got {rank!r}, {alpha!r})")
    modules = _as_list(raw.get("target_modules"))
    parameters = set(_as_list(raw.get("target_parameters")))
    targets = []
    if modules:
        targets.append("attention")
    for kind, names in PARAMETER_TARGETS.items():
        if set(names) <= parameters:
            targets.append(kind)
            parameters -= set(names)
    if parameters or not targets:
        left = sorted(parameters) or "nothing"
        raise AdapterError(
            f"{file}: target_parameters {left} are not what moelm adapts (all of {EXPERT_PARAMETERS}, of "
            f"{SHARED_PARAMETERS} or of {DENSE_PARAMETERS})"
        )
    return LoraSpec(rank=rank, alpha=float(alpha), targets=tuple(targets)), raw


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def load_adapter_into(model: MoELM, path: str | Path, dropout: float = 0.0) -> LoraSpec:
    """Attach the adapters of a PEFT directory to `model` (its base) and fill them from the file; `dropout` is
    the training setting the file does not carry (a resumed LoRA run passes its recipe's)."""
    path = Path(path)
    spec, raw = read_adapter_config(path)
    spec = dataclasses.replace(spec, dropout=dropout)
    file = path / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(file))
    except FileNotFoundError:
        raise AdapterError(f"{file} is missing") from None
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{file} is unreadable ({error})") from None
    attach_lora(model, spec)
    named = set(_as_list(raw.get("target_modules")))
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, module, to_peft, from_peft in _layouts(model):
        keys = set(to_peft)
        if target_of(name) == "attention" and name.rsplit(".", 1)[-1] not in named:
            for key, value in module.adapter.state_dict().items():  # not adapted in the file: a zero update
                ours[f"{name}.adapter.{key}"] = value
            continue
        absent = sorted(keys - set(tensors))
        if absent:
            raise AdapterError(f"{file}: no tensor {absent[0]!r} (the base model's layers do not match the adapter)")
        try:
            rebuilt = from_peft(tensors)
        except RuntimeError as error:  # a reshape of a tensor of the wrong size
            raise AdapterError(f"{file}: tensors of {name} do not fit the base model ({error})") from None
        ours.update({f"{name}.adapter.{key}": value for key, value in rebuilt.items()})
        used |= keys
    unused = sorted(set(tensors) - used)
    if unused:
        raise AdapterError(f"{file}: tensor {unused[0]!r} matches no layer of the base model")
    try:
        load_lora_state_dict(model, ours, str(file))
    except ValueError as error:
        raise AdapterError(str(error)) from None
    return spec


def base_model_path(path: str | Path) -> Path:
    """The base model directory an adapter names: as written, else relative to the adapter directory."""
    path = Path(path)
    _, raw = read_adapter_config(path)
    base = raw.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{path / ADAPTER_CONFIG}: base_model_name_or_path is empty (which model does it adapt?)")
    for candidate in (Path(base), path / base):
        if (candidate / "config.json").is_file():
            return candidate
    raise AdapterError(
        f"{path / ADAPTER_CONFIG}: base model {base!r} (base_model_name_or_path) is not a model directory here"
    )


def adapted_copy(model: MoELM, path: str | Path) -> MoELM:
    """A copy of `model` with the adapter in `path` merged in (the model itself is left as it is)."""
    adapted = copy.deepcopy(model)
    load_adapter_into(adapted, path)
    return merge_lora(adapted).eval()
