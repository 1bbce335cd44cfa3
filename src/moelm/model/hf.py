"""HF DeepseekV3 directory <-> MoELM: tensor names, expert (un)fusing and config mapping.

On disk we follow the published DeepSeek-V3 layout (per-expert `mlp.experts.N.{gate,up,down}_proj.weight`,
separate gate/up projections, MTP depth k as `model.layers.{num_hidden_layers + k}`); in memory experts are 3D
tensors and gate/up projections are fused. Fused expert keys written by some transformers versions are read
too. Loading uses safetensors only: no pickle is ever opened.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from moelm.config import ModelConfig, MoEOptions, options_from_legacy
from moelm.files import atomic_path, atomic_write_text
from moelm.model import fp8
from moelm.model.layers import RotaryEmbedding
from moelm.model.safetensors_reader import SafetensorsFile, SafetensorsFormatError

if TYPE_CHECKING:  # the model class is passed in, so this module never imports the network it serialises
    from moelm.model.transformer import MoELM

INDEX_FILE = "model.safetensors.index.json"
V2_ABSENT_SUFFIX = ".e_score_correction_bias"  # V2 selects without a bias: not stored, loaded as zeros
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the tensor and what was expected."""


# ---------------------------------------------------------------------------------------------- names
def _hf_prefix(our_name: str, config: ModelConfig) -> str:
    """Translate the module path of one of our tensors to its HF prefix (without fused-weight splitting)."""
    match = re.match(r"mtp\.(\d+)\.(.*)", our_name)
    if match:
        layer = config.num_hidden_layers + int(match.group(1))
        rest = match.group(2)
        rest = rest.removeprefix("block.")
        rest = rest.replace("shared_head_norm.", "shared_head.norm.")
        return f"model.layers.{layer}.{rest}"
    if our_name.startswith("lm_head."):
        return our_name
    return f"model.{our_name}"


def _expert_parts(hf_name: str, num_experts: int, intermediate: int) -> list[tuple[str, Callable]] | None:
    """Per-expert HF keys composing one of our fused expert tensors, with how to slice ours for each."""
    if hf_name.endswith(".experts.gate_up_proj"):
        base = hf_name.removesuffix("gate_up_proj")
        parts = []
        for e in range(num_experts):
            parts.append((f"{base}{e}.gate_proj.weight", lambda t, e=e: t[e, :intermediate]))
            parts.append((f"{base}{e}.up_proj.weight", lambda t, e=e: t[e, intermediate:]))
        return parts
    if hf_name.endswith(".experts.down_proj"):
        base = hf_name.removesuffix("down_proj")
        return [(f"{base}{e}.down_proj.weight", lambda t, e=e: t[e]) for e in range(num_experts)]
    return None


def hf_tensor_plan(model: MoELM) -> Iterator[tuple[str, list[tuple[str, Callable]]]]:
    """For each of our state-dict tensors: the HF keys that hold it and the slice of ours each one is."""
    config = model.config
    for name in model.state_dict():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if config.model_type == "deepseek_v2" and name.endswith(V2_ABSENT_SUFFIX):
            continue
        hf_name = _hf_prefix(name, config)
        experts = _expert_parts(hf_name, config.n_routed_experts, config.moe_intermediate_size)
        if experts is not None:
            yield name, experts
        elif hf_name.endswith("gate_up_proj.weight"):
            base = hf_name.removesuffix("gate_up_proj.weight")
            half = model.get_parameter(name).shape[0] // 2
            yield (
                name,
                [
                    (f"{base}gate_proj.weight", lambda t, half=half: t[:half]),
                    (f"{base}up_proj.weight", lambda t, half=half: t[half:]),
                ],
            )
        else:
            yield name, [(hf_name, lambda t: t)]


# ---------------------------------------------------------------------------------------------- save
def to_hf_state_dict(model: MoELM) -> dict[str, torch.Tensor]:
    """HF-named, contiguous tensors (per-expert keys; MTP layers carry their own embed/head copies)."""
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, parts in hf_tensor_plan(model):
        for hf_name, take in parts:
            out[hf_name] = take(ours[name]).detach().contiguous()
    for k in range(len(model.mtp)):
        prefix = f"model.layers.{model.config.num_hidden_layers + k}"
        out[f"{prefix}.embed_tokens.weight"] = ours["embed_tokens.weight"].detach().clone()
        out[f"{prefix}.shared_head.head.weight"] = ours["lm_head.weight"].detach().clone()
    return out


def parse_size(size: int | str) -> int:
    """Bytes from an int or a transformers-style size string ("5GB", "500MB", "2GiB")."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"invalid shard size {size!r}: expected bytes or a size such as '5GB' or '500MB'")
    unit = match.group(2).upper()
    power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base**power)


def save_pretrained(
    model: MoELM,
    path: str | Path,
    max_shard_bytes: int | str = 2 * 1024**3,
    strict_hf: bool = False,
    quantization: str | None = None,
    block: tuple[int, int] = fp8.DEFAULT_BLOCK,
) -> None:
    """Write config.json and safetensors shards (with an index past max_shard_bytes, e.g. "5GB"); strict_hf
    refuses options plain DeepseekV3 cannot load; quantization="fp8" stores the projection weights as DeepSeek's
    block-scaled FP8 (`weight_scale_inv` per block)."""
    if quantization not in (None, "fp8"):
        raise ValueError(f"invalid quantization {quantization!r}: must be None or 'fp8'")
    max_shard_bytes = parse_size(max_shard_bytes)
    if any(".adapter." in name for name in model.state_dict()):
        raise CheckpointError(
            "the model carries LoRA adapters: save them with moelm.model.peft_format.save_adapter, or merge them "
            "first (moelm.model.lora.merge_lora, `moelm export --merge-lora`)"
        )
    if any(p.dtype == torch.int8 for p in model.parameters()):
        raise CheckpointError("cannot save int8 weights (an inference-only format): save the model before quantizing")
    problems = model.config.hf_incompatibilities()
    if strict_hf and problems:
        raise CheckpointError(
            "this model cannot be exported as plain HF DeepseekV3: "
            + "; ".join(problems)
            + " (save without strict_hf to keep them under the 'moelm' config key)"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    if quantization == "fp8":
        for name in [n for n, t in tensors.items() if fp8.is_quantized_weight(n, t)]:
            tensors[name], tensors[name + fp8.SCALE_SUFFIX] = fp8.quantize(tensors[name], block)
    write_hf_tensors(
        path, [(n, t.numel() * t.element_size()) for n, t in tensors.items()], tensors.__getitem__, max_shard_bytes
    )
    write_hf_config(
        path,
        model.config,
        model.embed_tokens.weight.dtype,
        fp8.quantization_config(block) if quantization == "fp8" else None,
    )


def write_hf_tensors(
    path: Path, entries: list[tuple[str, int]], fetch: Callable[[str], torch.Tensor], max_shard_bytes: int
) -> None:
    """safetensors shards of at most max_shard_bytes (and an index when there are several) for `entries`
    (HF name, bytes), asking `fetch` for each tensor in order while its shard is written: a caller that reads
    tensors one at a time from disk (a sharded training checkpoint) holds one shard in memory, not the model."""
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, size in entries:
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        _atomic_save({name: fetch(name) for name in shards[0]}, path / SINGLE_FILE, metadata)
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save({name: fetch(name) for name in names}, path / filename, metadata)
        weight_map.update(dict.fromkeys(names, filename))
    index = {"metadata": {"total_size": sum(size for _, size in entries)}, "weight_map": weight_map}
    atomic_write_text(path / INDEX_FILE, json.dumps(index, indent=2))


def write_hf_config(path: Path, config: ModelConfig, dtype: torch.dtype, quantization: dict | None = None) -> None:
    """config.json of an HF directory whose weights are stored in `dtype`."""
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if quantization is not None:
        hf_config["quantization_config"] = quantization
    atomic_write_text(path / "config.json", json.dumps(hf_config, indent=2))


def _atomic_save(tensors: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _safe_open(file: Path) -> SafetensorsFile:
    """A safetensors file read with plain reads; a damaged or unreadable one is a CheckpointError naming it."""
    try:
        return SafetensorsFile(file)
    except SafetensorsFormatError as error:
        raise CheckpointError(f"{error}; re-save or re-download it") from None


# ---------------------------------------------------------------------------------------------- load
def _open_checkpoint(path: Path) -> dict[str, Path]:
    """Map every tensor name in the directory to the safetensors file that holds it."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a safetensors index (expected a 'weight_map' object)") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} lists shard(s) {missing} that are not in {path}")
        return {name: path / filename for name, filename in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (moelm never loads pickled .bin checkpoints)")
    located = {}
    for file in files:
        located.update(dict.fromkeys(_safe_open(file).keys(), file))
    return located


class _TensorReader:
    """Reads named tensors lazily from a set of safetensors files (headers parsed once per file)."""

    def __init__(self, locations: dict[str, Path], fp8_block: tuple[int, int] | None = None) -> None:
        self.locations = locations
        self.handles: dict[Path, object] = {}
        self.fp8_block = fp8_block

    def __contains__(self, name: str) -> bool:
        return name in self.locations

    def get(self, name: str) -> torch.Tensor:
        """The tensor, dequantised to float32 when it is stored as block-scaled FP8."""
        tensor = self._read(name)
        if tensor.dtype != fp8.FP8_DTYPE:
            return tensor
        scale_name = name + fp8.SCALE_SUFFIX
        scale = self._read(scale_name) if scale_name in self.locations else None
        try:
            return fp8.dequantize(name, tensor, scale, self.fp8_block or fp8.DEFAULT_BLOCK)
        except fp8.FP8FormatError as error:
            raise CheckpointError(str(error)) from None

    def _read(self, name: str) -> torch.Tensor:
        if name not in self.locations:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        file = self.locations[name]
        if file not in self.handles:
            self.handles[file] = _safe_open(file)
        try:
            return self.handles[file].get_tensor(name)
        except SafetensorsFormatError as error:  # a tensor whose bytes lie past a truncated end
            raise CheckpointError(f"{error}; the file is damaged") from None


def _assemble(name: str, parts: list[tuple[str, Callable]], target: torch.Tensor, reader: _TensorReader):
    """Build one of our tensors from its HF parts, checking every shape."""
    fused_name = _fused_expert_name(parts)
    if fused_name is not None and fused_name in reader and parts[0][0] not in reader:
        return _check_shape(fused_name, reader.get(fused_name), target.shape)
    if len(parts) == 1:
        return _check_shape(parts[0][0], reader.get(parts[0][0]), target.shape)
    assembled = torch.empty(target.shape, dtype=target.dtype)
    for hf_name, take in parts:
        slot = take(assembled)
        slot.copy_(_check_shape(hf_name, reader.get(hf_name), slot.shape))
    return assembled


def _fused_expert_name(parts: list[tuple[str, Callable]]) -> str | None:
    match = re.match(r"(.*\.experts\.)0\.(gate|down)_proj\.weight$", parts[0][0])
    if not match:
        return None
    return match.group(1) + ("gate_up_proj" if match.group(2) == "gate" else "down_proj")


def _check_shape(name: str, tensor: torch.Tensor, expected: torch.Size) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
    return tensor


def _moe_layers_as_stored(config: ModelConfig, reader: _TensorReader, path: Path) -> ModelConfig:
    """Trust the tensors over moe_layer_freq: transformers ignores the field and writes experts into every layer
    past the dense ones, so such a directory loads that way (with a note) instead of failing on missing MLPs."""
    if config.moe_layer_freq == 1:
        return config
    contradicted = [
        i
        for i in range(config.first_k_dense_replace, config.num_hidden_layers)
        if not config.is_moe_layer(i) and f"model.layers.{i}.mlp.gate.weight" in reader
    ]
    if not contradicted:
        return config
    print(
        f"note: {path} stores routed experts in layer(s) {contradicted}, which moe_layer_freq="
        f"{config.moe_layer_freq} calls dense (transformers ignores the field); loading every layer from "
        f"first_k_dense_replace={config.first_k_dense_replace} on as MoE",
        file=sys.stderr,
    )
    return config.replace(moe_layer_freq=1)


def open_pretrained(
    model_cls: type[MoELM],
    path: str | Path,
    mtp: bool = True,
    options: MoEOptions | None = None,
) -> tuple[MoELM, _TensorReader, torch.dtype | None]:
    """The directory's model built on the meta device (config and options resolved as for loading), its tensor
    reader, and the dtype its tensors load in by default when that is not float32 (bf16 for FP8 checkpoints)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected an HF DeepseekV3 model directory)")
    config, legacy = ModelConfig.from_json_with_options(config_file)
    if options is None and legacy:
        options = options_from_legacy(legacy, str(config_file))
    reader = tensor_reader(path)
    first_mtp_key = f"model.layers.{config.num_hidden_layers}.eh_proj.weight"
    if config.num_nextn_predict_layers and first_mtp_key not in reader:
        # transformers saves num_mtp_layers=1 without MTP weights; the trunk is still complete.
        warnings.warn(
            f"{path}: config asks for {config.num_nextn_predict_layers} MTP layer(s) but the checkpoint has no "
            f"{first_mtp_key!r}; loading without MTP",
            stacklevel=4,
        )
        config = config.replace(num_nextn_predict_layers=0)
    elif config.num_nextn_predict_layers and not mtp:
        print(
            f"note: skipping {config.num_nextn_predict_layers} MTP layer(s) of {path} (not used for inference)",
            file=sys.stderr,
        )
        config = config.replace(num_nextn_predict_layers=0)
    config = _moe_layers_as_stored(config, reader, path)
    with torch.device("meta"):
        model = model_cls(config, options)
    return model, reader, (torch.bfloat16 if reader.fp8_block is not None else None)


def pretrained_tensors(
    model: MoELM, path: str | Path, wanted: Callable[[str], bool] = lambda name: True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each of the model's tensors stored in `path` as float32, assembled from its HF parts one at a time, so a
    caller that keeps only its rows of each never holds the whole model. Which parts make which tensor is fixed
    from `model` now (its whole shapes; sharding it afterwards is fine); `wanted` skips names before they are read."""
    meta_state = model.state_dict()
    plan = [(name, parts, meta_state[name].shape) for name, parts in hf_tensor_plan(model)]
    reader = tensor_reader(Path(path))
    return (
        (name, _assemble(name, parts, torch.empty(shape, dtype=torch.float32), reader))
        for name, parts, shape in plan
        if wanted(name)
    )


def tensor_reader(path: Path) -> _TensorReader:
    """The directory's safetensors, read lazily (FP8 block scales applied)."""
    try:
        block = fp8.block_size(json.loads((path / "config.json").read_text()))
    except fp8.FP8FormatError as error:
        raise CheckpointError(f"{path / 'config.json'}: {error}") from None
    return _TensorReader(_open_checkpoint(path), block)


def load_pretrained(
    model_cls: type[MoELM],
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    mtp: bool = True,
    options: MoEOptions | None = None,
    float32_norms: bool = False,
) -> MoELM:
    """Build `model_cls` on the meta device, then fill every tensor from the checkpoint (no random init).

    mtp=False leaves the multi-token-prediction layers on disk (inference never runs them), with a note.
    float32_norms keeps RMSNorm weights float32 whatever `dtype` is (llama.cpp's bf16 files keep them so; with a
    float32 residual stream, see MoELM.set_activation_dtype, a rounded norm weight is a systematic error).
    """
    model, reader, stored_dtype = open_pretrained(model_cls, path, mtp, options)
    if torch.device(device).type == "meta":  # the shapes only: a parallel strategy fills each rank's rows
        return model
    config = model.config
    dtype = dtype or stored_dtype or torch.float32
    state = {}
    meta_state = model.state_dict()
    for name, parts in hf_tensor_plan(model):
        tensor = _assemble(name, parts, torch.empty(meta_state[name].shape, dtype=torch.float32), reader)
        target = meta_state[name]
        keep_fp32 = name.endswith(("gate.weight", "e_score_correction_bias")) and ".mlp.gate." in name
        keep_fp32 = keep_fp32 or (float32_norms and "norm" in name.rsplit(".", 2)[-2] and target.dim() == 1)
        state[name] = tensor.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    for name, buffer in meta_state.items():
        if name.endswith(V2_ABSENT_SUFFIX) and name not in state and config.model_type == "deepseek_v2":
            state[name] = torch.zeros(buffer.shape, dtype=torch.float32, device=device)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    rope_dim = model.rotary.inv_freq.shape[0] * 2
    model.rotary = RotaryEmbedding(config, rope_dim).to(device)
    leftovers = [n for n, p in model.named_parameters() if p.is_meta] + [
        n for n, b in model.named_buffers() if b.is_meta
    ]
    if leftovers:
        raise CheckpointError(f"checkpoint did not provide tensors for {leftovers}")
    return model.eval()
