"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes and reads its own pieces.

DCP stores each tensor as chunks with their offsets in the whole and reads back whatever chunks overlap what a
rank asks for, so a checkpoint written on one layout loads on any other (4 ranks -> 2, 2 -> 1, expert degree 2 ->
1, one process -> 4) without any rank holding the whole model. What DCP needs is each tensor's place in the
whole: FSDP shards are DTensors already; a routed-expert bank split by expert parallelism is wrapped as a DTensor
over an ("ep", "expert_replica") mesh (its expert block first, then its FSDP shard of the block, or replicated
over the block's replicas without FSDP); everything else is replicated and written once. Optimizer moments take
their parameter's place. Keys: `model.<name>` and `optim.<name>.<moment>`.

The directory is one part of a checkpoint (moelm.train.checkpoint seals it with a manifest and renames it into
place), and `export_hf` turns it into an HF model directory reading one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moelm.config import ModelConfig
from moelm.dist.expert_parallel import is_expert_parameter
from moelm.dist.runtime import ParallelContext
from moelm.dist.sharding import local_rows
from moelm.model.hf import hf_tensor_plan, parse_size, write_hf_config, write_hf_tensors
from moelm.model.transformer import MoELM

SHARDS_DIR = "shards"  # the DCP directory inside a checkpoint
CONFIG_FILE = "config.json"  # the model's HF config beside it, so the shards can be read without the recipe


def _placed(name: str, tensor: torch.Tensor, context: ParallelContext) -> torch.Tensor:
    """`tensor` (a parameter or one of its moments) as DCP must see it: its rank's piece of the whole."""
    if not (context.expert_degree > 1 and is_expert_parameter(name)):
        return tensor.data if isinstance(tensor, nn.Parameter) else tensor
    place = local_rows(name, tensor, context)
    placements = [Shard(0), Shard(0) if isinstance(tensor, DTensor) else Replicate()]
    shape = place.global_shape
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        place.local, context.ep_major_mesh, placements, run_check=False, shape=shape, stride=stride
    )


def _fill_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state before its first step (zero moments, step 0), so a load has tensors to fill."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad and not optimizer.state.get(param):
                on_device = group.get("fused") or group.get("capturable")  # else AdamW keeps `step` on the CPU
                optimizer.state[param] = {
                    "step": torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }


def state_views(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, context: ParallelContext
) -> dict[str, torch.Tensor]:
    """The flat DCP state of this rank: views of its parameters, buffers and moments (a load fills them in place)."""
    views = {f"model.{name}": _placed(name, p, context) for name, p in model.named_parameters()}
    persistent = model.state_dict().keys()
    views.update({f"model.{name}": b for name, b in model.named_buffers() if name in persistent})
    if optimizer is not None:
        names = {id(p): name for name, p in model.named_parameters()}
        for param, entry in optimizer.state.items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    placed = _placed(names[id(param)], value, context) if value.dim() else value
                    views[f"optim.{names[id(param)]}.{key}"] = placed
    return views


def save_shards(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, context: ParallelContext
) -> None:
    """Every rank writes its pieces into `directory` (one file per rank plus DCP's metadata from rank 0)."""
    dcp.save(state_views(model, optimizer, context), checkpoint_id=str(directory), no_dist=not context.distributed)


def load_shards(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, context: ParallelContext
) -> None:
    """Fill this rank's parameters, buffers and optimizer moments from `directory`, written on any layout."""
    if optimizer is not None:
        _fill_optimizer_state(optimizer)
    stored = set(stored_keys(directory))
    views = state_views(model, optimizer, context)
    missing = sorted(k for k in views if k.startswith("model.") and k not in stored)
    if missing:
        raise ValueError(f"{directory}: the sharded checkpoint has no {missing[:3]} (a checkpoint of another model?)")
    wanted = {k: v for k, v in views.items() if k in stored}
    dcp.load(wanted, checkpoint_id=str(directory), no_dist=not context.distributed)


def stored_keys(directory: Path) -> list[str]:
    """The keys a DCP directory holds (read from its metadata, no tensor data)."""
    return list(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)


def read_tensor(directory: Path, key: str, shape: torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One whole tensor of a DCP directory, in one process (the other tensors stay on disk)."""
    tensor = torch.empty(shape, dtype=dtype)
    dcp.load({key: tensor}, checkpoint_id=str(directory), no_dist=True)
    return tensor


def export_hf(
    checkpoint: Path, out: Path, max_shard_bytes: int | str = "5GB", dtype: torch.dtype | None = None
) -> ModelConfig:
    """Write a sharded checkpoint as an HF model directory, one tensor of the checkpoint in memory at a time
    (plus the safetensors shard being written)."""
    config, _ = ModelConfig.from_json_with_options(checkpoint / CONFIG_FILE)
    shards = checkpoint / SHARDS_DIR
    with torch.device("meta"):
        model = MoELM(config)
    meta = model.state_dict()
    dtype = dtype or torch.float32
    sources: dict[str, tuple[str, Callable]] = {}
    for name, parts in hf_tensor_plan(model):
        for hf_name, take in parts:
            sources[hf_name] = (name, take)
    for k in range(len(model.mtp)):  # the MTP layers carry their own copies of the embedding and the head
        prefix = f"model.layers.{config.num_hidden_layers + k}"
        sources[f"{prefix}.embed_tokens.weight"] = ("embed_tokens.weight", lambda t: t)
        sources[f"{prefix}.shared_head.head.weight"] = ("lm_head.weight", lambda t: t)
    if config.tie_word_embeddings:
        meta["lm_head.weight"] = meta["embed_tokens.weight"]
    cache: dict[str, torch.Tensor] = {}

    def stored_dtype(name: str) -> torch.dtype:
        return torch.float32 if ".mlp.gate." in name else dtype  # routers stay float32, as from_pretrained keeps them

    def fetch(hf_name: str) -> torch.Tensor:
        name, take = sources[hf_name]
        if name not in cache:  # an expert bank feeds many HF keys in a row: read it once
            cache.clear()
            key = "embed_tokens.weight" if config.tie_word_embeddings and name == "lm_head.weight" else name
            cache[name] = read_tensor(shards, f"model.{key}", meta[name].shape)
        return take(cache[name]).to(stored_dtype(name)).contiguous()

    entries = [
        (hf_name, take(meta[name]).numel() * stored_dtype(name).itemsize) for hf_name, (name, take) in sources.items()
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_hf_tensors(out, entries, fetch, parse_size(max_shard_bytes))
    write_hf_config(out, config, dtype)
    return config
