"""`moelm plan`: what a layout costs each rank before any rank starts: memory, traffic and a step-time bound.

Everything is counted from the model's own tensors and from what moelm's training step keeps, not from rules of
thumb:

- Training state: every parameter of the model (built on the meta device, so a 671B shape costs nothing) is put
  on its pipeline stage, split over the expert group when it is a routed expert, and sharded over the stage's
  data-parallel ranks by FSDP (parameters, gradients and AdamW moments; ZeRO-1 shards the moments only). moelm
  keeps float32 master weights, float32 gradients and two float32 moments: 4 + 4 + 8 bytes per element.
- Activations: the tensors autograd saves for the backward, per token and layer, as moelm's MLA attention,
  dense and MoE blocks save them (counted from the implementation, and checked against the saved-tensor bytes
  of real runs, see `moelm.dist.meters.SavedTensorMeter`), times the micro-batches a pipeline schedule keeps in flight.
- Traffic per step: all-to-all rows of expert parallelism (uniform routing: (P-1)/P of the rows leave a rank,
  forward and backward, dispatch and combine), FSDP's all-gathers and reduce-scatters, and pipeline activations.
- Step time: FLOPs at the GPU's dense bf16 peak plus traffic at link bandwidth (NVLink inside a node, the
  network across nodes), stretched by the schedule's bubble: a lower bound a real run reaches only in part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from moelm.config import ConfigError, ModelConfig, MoEOptions

GIB = 1024**3


@dataclass(frozen=True)
class GPUSpec:
    """Spec-sheet figures (SXM parts): dense bf16 peak, memory, NVLink bandwidth per GPU and direction."""

    name: str
    peak_bf16_flops: float
    memory_bytes: float
    nvlink_bytes_per_s: float


GPUS = {
    "h100": GPUSpec("H100 SXM", 989e12, 80e9, 450e9),
    "h800": GPUSpec("H800 SXM", 989e12, 80e9, 200e9),
    "h200": GPUSpec("H200 SXM", 989e12, 141e9, 450e9),
    "a100": GPUSpec("A100 SXM 80GB", 312e12, 80e9, 300e9),
}
DEFAULT_LINK_GBPS = 400.0  # one 400 Gb/s InfiniBand NIC per GPU, as in DeepSeek-V3's cluster
SHARDINGS = ("fsdp", "zero1", "none")


@dataclass(frozen=True)
class Layout:
    """How a run spreads over its GPUs, and the step it takes."""

    gpus: int
    pipeline_degree: int = 1
    expert_degree: int = 1
    sharding: str = "fsdp"  # fsdp (ZeRO-3): params, grads, moments sharded; zero1: moments only; none
    schedule: str = "1f1b"
    virtual_stages: int = 2
    batch_size: int = 8  # rows of one micro-batch over all data-parallel ranks (train.batch_size)
    grad_accum: int = 1
    seq_len: int = 256
    activation_bytes: int = 4  # 4 float32 training, 2 under bf16 autocast (an approximation: see README)
    checkpointing: str = "none"
    reshard_after_forward: bool = True
    gpus_per_node: int = 8

    @property
    def dp(self) -> int:
        return self.gpus // self.pipeline_degree

    @property
    def chunks(self) -> int:
        """Stages per pipeline rank."""
        if self.pipeline_degree == 1:
            return 1
        return {"1f1b": 1, "interleaved_1f1b": self.virtual_stages, "dualpipev": 2}[self.schedule]

    def check(self, config: ModelConfig) -> None:
        """The layout's degrees against the world and the model, each violation named as the recipe names it."""
        if self.gpus % self.pipeline_degree:
            raise ConfigError(f"parallel.pipeline_degree={self.pipeline_degree} must divide --gpus {self.gpus}")
        if self.dp % self.expert_degree:
            raise ConfigError(
                f"parallel.expert_degree={self.expert_degree} must divide the ranks of a stage {self.dp}"
            )
        if config.n_routed_experts % self.expert_degree:
            raise ConfigError(
                f"parallel.expert_degree={self.expert_degree} must divide model.n_routed_experts="
                f"{config.n_routed_experts}"
            )
        if self.batch_size % self.dp:
            raise ConfigError(
                f"train.batch_size={self.batch_size} must be a multiple of the data-parallel ranks {self.dp}"
            )
        if self.pipeline_degree * self.chunks > config.num_hidden_layers:
            raise ConfigError(
                f"{self.pipeline_degree * self.chunks} pipeline stages for model.num_hidden_layers="
                f"{config.num_hidden_layers}"
            )
        if self.sharding not in SHARDINGS:
            raise ConfigError(f"invalid --sharding {self.sharding!r}: must be one of {', '.join(SHARDINGS)}")


# ---------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class TensorInfo:
    name: str
    numel: int
    place: str  # "layer" | "first" (embedding) | "last" (final norm, head, MTP)
    layer: int
    expert: bool


def model_tensors(config: ModelConfig) -> list[TensorInfo]:
    """Every parameter of the model with where a pipeline puts it (built on the meta device)."""
    from moelm.dist.expert_parallel import is_expert_parameter
    from moelm.model.transformer import MoELM

    with torch.device("meta"):
        model = MoELM(config, MoEOptions())
    tensors = []
    for name, param in model.named_parameters():
        if name.startswith("layers."):
            place, layer = "layer", int(name.split(".")[1])
        elif name.startswith("embed_tokens"):
            place, layer = "first", -1
        else:
            place, layer = "last", config.num_hidden_layers
        tensors.append(TensorInfo(name, param.numel(), place, layer, is_expert_parameter(name)))
    return tensors


def rank_layers(config: ModelConfig, layout: Layout, pp_rank: int) -> tuple[list[int], bool, bool]:
    """The blocks pipeline rank `pp_rank` holds, and whether it holds the first / last stage."""
    if layout.pipeline_degree == 1:
        return list(range(config.num_hidden_layers)), True, True
    from moelm.dist.pipeline import plan_stages

    plans = plan_stages(config.num_hidden_layers, layout.pipeline_degree, layout.schedule, layout.virtual_stages)
    own = [plan for plan in plans if plan.rank == pp_rank]
    layers = [i for plan in own for i in plan.layers]
    return layers, any(p.index == 0 for p in own), any(p.index == len(plans) - 1 for p in own)


@dataclass
class StateBytes:
    parameters: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    parameter_count: float = 0.0  # this rank's elements before sharding (what it computes with)

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer


def state_bytes(tensors: list[TensorInfo], config: ModelConfig, layout: Layout, pp_rank: int) -> StateBytes:
    """Master weights, gradients and AdamW moments this rank keeps (float32 each)."""
    layers, first, last = rank_layers(config, layout, pp_rank)
    owned = set(layers)
    out = StateBytes()
    for tensor in tensors:
        here = {"layer": tensor.layer in owned, "first": first, "last": last}[tensor.place]
        if not here:
            continue
        elements = tensor.numel / (layout.expert_degree if tensor.expert else 1)
        out.parameter_count += elements
        shards = layout.dp // layout.expert_degree if tensor.expert else layout.dp
        sharded = elements / shards
        out.parameters += 4 * (sharded if layout.sharding == "fsdp" else elements)
        out.gradients += 4 * (sharded if layout.sharding == "fsdp" else elements)
        out.optimizer += 8 * (sharded if layout.sharding in ("fsdp", "zero1") else elements)
    return out


# ---------------------------------------------------------------------------------------------- activations
def layer_activation_bytes(config: ModelConfig, layer: int, seq_len: int, f: int, checkpointing: str) -> float:
    """Bytes one token leaves saved for the backward in block `layer` (MLA attention, dense or MoE FFN)."""
    h, heads = config.hidden_size, config.num_attention_heads
    if checkpointing == "full":
        return f * h  # the block's input; the rest is recomputed one block at a time (`peak_recompute`)
    qk, v, rope = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim, config.qk_rope_head_dim
    norms = 2 * (f * 2 * h + 4)  # input and output of x * rms, and rms, for both pre-norms
    query = f * h + (f * 3 * config.q_lora_rank + 4 if config.q_lora_rank else 0)
    latent = f * (3 * config.kv_lora_rank + rope) + 4
    # SDPA keeps q, k, v (v padded to the q/k width) and its output, its log-sum-exp, and the document mask.
    attention = f * (2 * heads * qk + 2 * heads * max(qk, v) + heads * v) + 4 * heads + f * seq_len
    total = norms + query + latent + attention
    if not config.is_moe_layer(layer):
        return total + f * (h + 4 * config.intermediate_size)
    k, experts = config.num_experts_per_tok, config.n_routed_experts
    inner, shared = config.moe_intermediate_size, config.n_shared_experts * config.moe_intermediate_size
    router = 4 * (h + experts + 1 + k) + 8 * k  # float32 input and scores, ids, combine weights
    if checkpointing == "moe":
        return total + router + 12 * k
    routed = f * k * (2 * h + 4 * inner) + 20 * k  # gathered rows, gate/up, activation, product, outputs, indices
    return total + router + routed + f * 4 * shared


def edge_activation_bytes(config: ModelConfig, first: bool, last: bool, f: int) -> float:
    """Per token outside the blocks: token ids and rotary tables (first), final norm, head input, float32
    logits and labels (last)."""
    out = 8 + 4 * config.qk_rope_head_dim if first else 4 * config.qk_rope_head_dim
    if last:
        out += f * 2 * config.hidden_size + 4 + f * config.hidden_size + 4 * config.vocab_size + 8
    return out


def mtp_activation_bytes(config: ModelConfig, seq_len: int, f: int, checkpointing: str) -> float:
    """Per token of each MTP depth: both norms, the merged projection's input, its block, the shared head norm,
    the head's input, float32 logits, targets and rotary tables."""
    h = config.hidden_size
    out = 0.0
    for depth in range(1, config.num_nextn_predict_layers + 1):
        block = layer_activation_bytes(config, config.num_hidden_layers + depth - 1, seq_len - depth, f, checkpointing)
        edges = (f * 2 * h + 4) + (f * h + 4) + f * 2 * h + (f * 2 * h + 4) + f * h + 4 * config.vocab_size + 8
        out += (block + edges + 4 * config.qk_rope_head_dim) * (seq_len - depth) / seq_len
    return out


def in_flight(layout: Layout, pp_rank: int) -> float:
    """Micro-batches of this rank's activations alive at the schedule's peak (in whole-rank units)."""
    stages, micro = layout.pipeline_degree, layout.grad_accum
    if stages == 1:
        return 1
    if layout.schedule == "1f1b":
        return min(stages - pp_rank, micro)
    # Interleaved 1F1B warms up (v-1)S + 2(S-1-r) chunk forwards before its first backward (DualPipeV: v = 2);
    # each chunk holds 1/v of the rank's blocks.
    chunks = layout.chunks
    warm = min(micro * chunks, (chunks - 1) * stages + 2 * (stages - 1 - pp_rank) + 1)
    return warm / chunks


# ---------------------------------------------------------------------------------------------- traffic and time
@dataclass
class RankPlan:
    """One pipeline rank's figures (every data-parallel rank of a stage has the same)."""

    pp_rank: int
    layers: list[int]
    state: StateBytes
    activations: float  # saved for the backward at the schedule's peak
    recompute: float  # one block rebuilt by activation checkpointing during its backward
    gather_buffer: float  # FSDP: the unsharded parameters of the unit in use and the one prefetched
    a2a_bytes: float
    fsdp_bytes: float
    pipeline_bytes: float
    flops: float
    compute_s: float
    comm_s: float

    @property
    def memory(self) -> float:
        return self.state.total + self.activations + self.recompute + self.gather_buffer


def _flops_per_token(
    config: ModelConfig, layers: list[int], tensors: list[TensorInfo], last: bool
) -> tuple[float, float]:
    """Training FLOPs per token of these blocks: 6 x active weights, and the causal attention term per unit of
    sequence length (as the trainer's MFU counts them)."""
    active = 0.0
    k, experts = config.num_experts_per_tok, config.n_routed_experts
    owned = set(layers)
    for tensor in tensors:
        if (tensor.place == "layer" and tensor.layer in owned) or (tensor.place == "last" and last):
            active += tensor.numel * (k / experts if tensor.expert else 1)
    qk_v = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    return 6 * active, 3 * len(layers) * config.num_attention_heads * qk_v


def plan_rank(
    config: ModelConfig, layout: Layout, gpu: GPUSpec, link_bytes_per_s: float, tensors: list[TensorInfo], pp_rank: int
) -> RankPlan:
    layers, first, last = rank_layers(config, layout, pp_rank)
    f = layout.activation_bytes
    tokens = layout.batch_size // layout.dp * layout.seq_len  # this rank's tokens per micro-batch
    per_token = sum(layer_activation_bytes(config, i, layout.seq_len, f, layout.checkpointing) for i in layers)
    per_token += edge_activation_bytes(config, first, last, f)
    if last:
        per_token += mtp_activation_bytes(config, layout.seq_len, f, layout.checkpointing)
    activations = tokens * per_token * in_flight(layout, pp_rank)
    recompute = 0.0
    if layout.checkpointing == "full" and layers:  # one block's activations rebuilt during its backward
        recompute = tokens * max(layer_activation_bytes(config, i, layout.seq_len, f, "none") for i in layers)
    state = state_bytes(tensors, config, layout, pp_rank)
    steps = layout.grad_accum
    # All-to-all: rows leaving the rank, dispatch and combine, forward and backward (and a recomputed forward).
    passes = 3 if layout.checkpointing == "full" else 2
    moe_layers = sum(config.is_moe_layer(i) for i in layers)
    p = layout.expert_degree
    a2a = steps * moe_layers * tokens * config.num_experts_per_tok * (p - 1) / p * config.hidden_size * f * 2 * passes
    # FSDP: gather every unit in forward (and again in backward when resharded), reduce-scatter float32 grads.
    d = layout.dp
    gather_dtype = 2 if f == 2 else 4
    unit_shares = state.parameter_count * (d - 1) / d
    fsdp = 0.0
    if layout.sharding == "fsdp" and d > 1:
        gathers = 2 if layout.reshard_after_forward else 1
        reductions = 1 if layout.pipeline_degree > 1 else steps
        fsdp = steps * gathers * unit_shares * gather_dtype + reductions * unit_shares * 4
    elif layout.sharding in ("zero1", "none") and d > 1:
        fsdp = 2 * unit_shares * 4 + (unit_shares * 4 if layout.sharding == "zero1" else 0)
    largest = max(
        (sum(t.numel for t in tensors if t.place == "layer" and t.layer == i) for i in layers), default=0
    )
    gather_buffer = 2 * largest * gather_dtype if layout.sharding == "fsdp" and d > 1 else 0.0
    pipeline = 0.0
    if layout.pipeline_degree > 1:
        boundaries = layout.chunks * 2 - (1 if first else 0) - (1 if last else 0)
        pipeline = steps * boundaries * tokens * config.hidden_size * f
    dense, attention = _flops_per_token(config, layers, tensors, last)
    flops = steps * tokens * (dense + attention * layout.seq_len) * (4 / 3 if layout.checkpointing == "full" else 1)
    compute = flops / gpu.peak_bf16_flops
    inside = min(p, layout.gpus_per_node)
    intra_share = (inside - 1) / (p - 1) if p > 1 else 1.0
    a2a_s = a2a * (intra_share / gpu.nvlink_bytes_per_s + (1 - intra_share) / link_bytes_per_s)
    dp_bandwidth = gpu.nvlink_bytes_per_s if layout.dp <= layout.gpus_per_node else link_bytes_per_s
    comm = a2a_s + fsdp / dp_bandwidth + pipeline / link_bytes_per_s
    return RankPlan(
        pp_rank, layers, state, activations, recompute, gather_buffer, a2a, fsdp, pipeline, flops, compute, comm
    )


def bubble(layout: Layout) -> float:
    """Idle share a schedule adds to each rank's work: (S-1)/(v M) for 1F1B and its interleaved form; DualPipeV
    overlaps the two directions of its V and is counted as interleaved with v = 2."""
    if layout.pipeline_degree == 1:
        return 0.0
    return (layout.pipeline_degree - 1) / (layout.chunks * layout.grad_accum)


@dataclass
class Plan:
    config_name: str
    layout: Layout
    gpu: GPUSpec
    link_gbps: float
    ranks: list[RankPlan]
    tokens_per_step: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak_memory(self) -> float:
        return max(rank.memory for rank in self.ranks)

    @property
    def fits(self) -> bool:
        return self.peak_memory <= self.gpu.memory_bytes

    @property
    def step_s(self) -> float:
        """Serial bound: the slowest rank's compute plus its traffic, then the bubble."""
        return max(rank.compute_s + rank.comm_s for rank in self.ranks) * (1 + bubble(self.layout))

    @property
    def overlapped_step_s(self) -> float:
        """Overlapped bound: traffic hidden behind compute where it is shorter (DualPipe's aim)."""
        return max(max(rank.compute_s, rank.comm_s) for rank in self.ranks) * (1 + bubble(self.layout))

    def to_dict(self) -> dict[str, Any]:
        ranks = []
        for rank in self.ranks:
            entry = asdict(rank)
            entry["layers"] = [rank.layers[0], rank.layers[-1]] if rank.layers else []
            entry["memory"] = rank.memory
            entry["state"]["total"] = rank.state.total
            ranks.append(entry)
        return {
            "model": self.config_name,
            "layout": asdict(self.layout),
            "gpu": asdict(self.gpu),
            "link_gbps": self.link_gbps,
            "ranks": ranks,
            "peak_memory_bytes": self.peak_memory,
            "fits": self.fits,
            "step_s": self.step_s,
            "overlapped_step_s": self.overlapped_step_s,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_s_per_gpu": self.tokens_per_step / self.step_s / self.layout.gpus,
            "notes": self.notes,
        }


def make_plan(
    config: ModelConfig, layout: Layout, gpu: str = "h100", link_gbps: float = DEFAULT_LINK_GBPS, name: str = ""
) -> Plan:
    """Every pipeline rank's memory, traffic and time for `layout` (see the module docstring)."""
    if gpu not in GPUS:
        raise ConfigError(f"invalid --gpu {gpu!r}: must be one of {', '.join(GPUS)}")
    layout.check(config)
    if config.attention != "mla":
        raise ConfigError(f"moelm plan counts MLA attention's activations; model.attention={config.attention!r}")
    tensors = model_tensors(config)
    link = link_gbps * 1e9 / 8
    ranks = [plan_rank(config, layout, GPUS[gpu], link, tensors, r) for r in range(layout.pipeline_degree)]
    notes = []
    if layout.pipeline_degree > 1 and config.num_nextn_predict_layers:
        notes.append("MTP counted on the last stage (as DeepSeek-V3 places it); moelm's pipeline refuses MTP")
    tokens = layout.batch_size * layout.seq_len * layout.grad_accum
    return Plan(name, layout, GPUS[gpu], link_gbps, ranks, tokens, notes)


def layouts_that_fit(config: ModelConfig, layout: Layout, gpu: str, link_gbps: float) -> list[Plan]:
    """Other pipeline and expert degrees (FSDP sharding) on the same GPUs and batch, fastest first."""
    found = []
    for pp in range(1, layout.gpus + 1):
        if layout.gpus % pp:
            continue
        for ep in range(1, layout.gpus // pp + 1):
            candidate = replace(layout, pipeline_degree=pp, expert_degree=ep, sharding="fsdp")
            if candidate.schedule != "1f1b" and pp == 1:
                candidate = replace(candidate, schedule="1f1b")
            try:
                plan = make_plan(config, candidate, gpu, link_gbps)
            except ConfigError:
                continue
            if plan.fits:
                found.append(plan)
    return sorted(found, key=lambda plan: plan.step_s)


def format_plan(plan: Plan) -> str:
    """The plan as a table: one row per pipeline rank, then the verdict."""
    layout = plan.layout
    lines = [
        f"{plan.config_name or 'model'} on {layout.gpus} x {plan.gpu.name} ({plan.gpu.memory_bytes / 1e9:.0f} GB, "
        f"link {plan.link_gbps:g} Gb/s): PP{layout.pipeline_degree} ({layout.schedule}) x EP{layout.expert_degree}"
        f" x DP{layout.dp} ({layout.sharding}); micro-batch {layout.batch_size} rows x {layout.seq_len} tokens, "
        f"{layout.grad_accum} per step",
        f"{'pp rank':>7} {'blocks':>9} {'params':>9} {'grads':>9} {'optim':>9} {'activ.':>9} {'gather':>8} "
        f"{'total GiB':>9} {'a2a GB':>8} {'fsdp GB':>8} {'pp GB':>7} {'compute s':>9} {'comm s':>8}",
    ]
    for rank in plan.ranks:
        blocks = f"{rank.layers[0]}-{rank.layers[-1]}" if rank.layers else "-"
        lines.append(
            f"{rank.pp_rank:>7} {blocks:>9} {rank.state.parameters / GIB:>9.2f} {rank.state.gradients / GIB:>9.2f} "
            f"{rank.state.optimizer / GIB:>9.2f} {rank.activations / GIB:>9.2f} {rank.gather_buffer / GIB:>8.2f} "
            f"{rank.memory / GIB:>9.2f} {rank.a2a_bytes / 1e9:>8.2f} {rank.fsdp_bytes / 1e9:>8.2f} "
            f"{rank.pipeline_bytes / 1e9:>7.2f} {rank.compute_s:>9.3f} {rank.comm_s:>8.3f}"
        )
    spare = plan.gpu.memory_bytes - plan.peak_memory
    verdict = "fits" if plan.fits else "does not fit"
    lines.append(
        f"{verdict}: peak {plan.peak_memory / GIB:.2f} GiB of {plan.gpu.memory_bytes / GIB:.2f} GiB per GPU "
        f"({'spare' if spare >= 0 else 'over by'} {abs(spare) / GIB:.2f} GiB)"
    )
    rate = plan.tokens_per_step / plan.step_s / layout.gpus
    lines.append(
        f"step >= {plan.step_s:.3f} s serial, >= {plan.overlapped_step_s:.3f} s with traffic overlapped "
        f"(bubble {bubble(layout):.1%}); <= {rate:,.0f} tokens/s per GPU at 100% of bf16 peak"
    )
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
