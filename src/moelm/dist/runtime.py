"""The process group and device meshes of a torchrun launch, or a one-process context without torchrun.

Layout (as torchtitan lays it out): every rank is a data-parallel rank. With expert degree P the world of W ranks
is a 2D mesh (W/P, P) named ("expert_replica", "ep"): the P ranks of an "ep" row split the routed experts into
P contiguous blocks and exchange tokens by all-to-all; the W/P ranks of an "expert_replica" column hold the same
experts and shard them among themselves (FSDP). Dense parameters (attention, shared experts, router, norms,
embeddings) are sharded over all W ranks through a 1D mesh ("dp",). The inner "ep" dimension keeps an
all-to-all group on neighbouring ranks, which on GPUs means inside one node.

With pipeline degree S the world is first cut into S stages of D = W/S consecutive ranks ("pp" outermost, as
torchtitan lays it out): rank = stage x D + data-parallel rank. Each stage holds a contiguous run of blocks and
is itself the 2D layout above over its D ranks; the ranks with the same data-parallel rank in every stage form
one "pp" group that passes activations forward and gradients back (point to point).
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from typing import NoReturn
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moelm.devices import resolve_device

RENDEZVOUS_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class ParallelSetupError(ValueError):
    """A launch that cannot work: a missing torchrun variable, an expert degree that does not divide."""


@dataclass
class ParallelContext:
    """Where this process stands: rank, world, device and the meshes of its parallel dimensions."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    expert_degree: int = 1
    fsdp: bool = False
    reshard_after_forward: bool = True
    pipeline_degree: int = 1
    dense_mesh: DeviceMesh | None = None  # ("dp",) over the ranks of this pipeline stage (all ranks without PP)
    expert_mesh: DeviceMesh | None = None  # ("expert_replica", "ep") over the same ranks
    pipeline_mesh: DeviceMesh | None = None  # ("pp",): this rank's peers in the other stages
    ep_major_mesh: DeviceMesh | None = None  # ("ep", "expert_replica"): expert mesh transposed (DCP's view)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return self.expert_mesh.get_group("ep") if self.expert_mesh is not None and self.expert_degree > 1 else None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.expert_degree

    @property
    def dp_size(self) -> int:
        """Ranks that split each batch: the ranks of one pipeline stage (the world without pipelining)."""
        return self.world_size // self.pipeline_degree

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp_size

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage (its first stage where it holds several)."""
        return self.rank // self.dp_size

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        return self.dense_mesh.get_group("dp") if self.dense_mesh is not None else None

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.pipeline_mesh.get_group("pp") if self.pipeline_mesh is not None else None

    @property
    def replica_group(self) -> dist.ProcessGroup | None:
        """Ranks holding the same experts (all ranks when there is no expert parallelism)."""
        if self.expert_mesh is None:
            return None
        return self.expert_mesh.get_group("expert_replica")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_parallel(
    device_spec: str = "auto",
    expert_degree: int = 1,
    fsdp: bool | None = None,
    reshard_after_forward: bool = True,
    backend: str | None = None,
    timeout_s: float = 300.0,
    num_experts: int | None = None,
    pipeline_degree: int = 1,
) -> ParallelContext:
    """Join the torchrun process group (when WORLD_SIZE > 1) and build the meshes; one process otherwise.

    The backend follows the device (nccl on CUDA, gloo on CPU) unless given; a collective waiting longer than
    timeout_s raises on every rank, so one failed rank never leaves the others hanging.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        for key, degree in (("expert_degree", expert_degree), ("pipeline_degree", pipeline_degree)):
            if degree != 1:
                raise ParallelSetupError(
                    f"parallel.{key}={degree} needs {degree} processes: launch with "
                    f"torchrun --nproc-per-node {degree} -m moelm ..."
                )
        return ParallelContext(device=resolve_device(device_spec, 0))
    missing = [name for name in RENDEZVOUS_VARIABLES if name not in os.environ]
    if missing:
        raise ParallelSetupError(f"WORLD_SIZE={world} but {missing} are not set: launch with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if world % pipeline_degree:
        raise ParallelSetupError(
            f"parallel.pipeline_degree={pipeline_degree} must divide the world size {world} (ranks per stage)"
        )
    stage_ranks = world // pipeline_degree
    if stage_ranks % expert_degree:
        where = (
            f"the world size {world}"
            if pipeline_degree == 1
            else f"the ranks of a pipeline stage {stage_ranks} (world size / parallel.pipeline_degree)"
        )
        raise ParallelSetupError(f"parallel.expert_degree={expert_degree} must divide {where}")
    if num_experts is not None and num_experts % expert_degree:
        raise ParallelSetupError(
            f"parallel.expert_degree={expert_degree} must divide model.n_routed_experts={num_experts}"
        )
    device = resolve_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(_destroy_at_exit)
    stages, replicas = pipeline_degree, stage_ranks // expert_degree
    dense = init_device_mesh(device.type, (stages, stage_ranks), mesh_dim_names=("pp", "dp"))
    experts = init_device_mesh(
        device.type, (stages, replicas, expert_degree), mesh_dim_names=("pp", "expert_replica", "ep")
    )
    # Rank (stage s, replica r, ep p) at (s, p, r): DCP cuts an expert bank by block first, then by replica.
    ep_major = DeviceMesh(
        device.type,
        torch.arange(world).view(stages, replicas, expert_degree).transpose(1, 2).contiguous(),
        mesh_dim_names=("pp", "ep", "expert_replica"),
    )
    return ParallelContext(
        device=device,
        world_size=world,
        rank=rank,
        expert_degree=expert_degree,
        fsdp=True if fsdp is None else fsdp,
        reshard_after_forward=reshard_after_forward,
        pipeline_degree=pipeline_degree,
        dense_mesh=dense["dp"],
        expert_mesh=experts["expert_replica", "ep"],
        pipeline_mesh=dense["pp"],
        ep_major_mesh=ep_major["ep", "expert_replica"],
    )


def end_process(code: int) -> NoReturn:
    """End a torchrun worker: run the exit handlers (the process group is destroyed there) while the interpreter
    is whole, then leave without interpreter finalisation. Objects that still hold gloo groups (device meshes,
    sharded tensors) destroyed during finalisation aborted finished ranks now and then (SIGABRT, "terminate
    called without an active exception"), which torchrun reports as a failed run."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def _destroy_at_exit() -> None:
    """Tear the process group down while the interpreter is still whole: gloo's worker threads left alive into
    interpreter finalisation can abort the process (SIGABRT, "terminate called without an active exception")
    after a run that otherwise succeeded."""
    if dist.is_initialized():
        dist.destroy_process_group()
