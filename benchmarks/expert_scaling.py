"""Training-step time as routed experts grow 8 -> 64 at fixed top-k and width: the sparse-activation claim.

Total parameters grow with the expert count while active parameters stay fixed, so an ideal MoE step costs the
same at every count. moelm and transformers' DeepseekV3ForCausalLM (same configs, same weights, grouped_mm
experts) run a forward, backward and AdamW step on the same tokens in one process, all counts and both
implementations timed in turn, round after round; `--reuse-freed-memory` applies `moelm pretrain`'s allocator
setting to both.

    python benchmarks/expert_scaling.py [--experts 8,16,32,64 --top-k 4 --hidden 256 --intermediate 128]
"""

from __future__ import annotations

import argparse
import json

import torch
from common import add_allocator_flag, apply_allocator_flag, interleaved_medians, training_step, transformers_twin

from moelm import ModelConfig, MoELM


def build(args: argparse.Namespace, experts: int) -> tuple[MoELM, torch.nn.Module]:
    """A moelm model and the transformers model loaded from its saved directory."""
    config = ModelConfig(
        vocab_size=2048,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=experts,
        num_experts_per_tok=args.top_k,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
    )
    torch.manual_seed(0)
    ours = MoELM(config).train()
    return ours, transformers_twin(ours, experts_implementation="grouped_mm").train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="8,16,32,64")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    add_allocator_flag(parser)
    args = parser.parse_args()
    apply_allocator_flag(args)
    ids = torch.randint(0, 2048, (args.batch, args.seq))
    counts = [int(e) for e in args.experts.split(",")]
    results: dict[str, float] = {}
    models = {experts: build(args, experts) for experts in counts}
    # Every (count, implementation) pair is timed in the same rounds, so a drift of the machine's speed between
    # building the 8-expert and the 64-expert models cannot bend either implementation's scaling ratio.
    steps = {}
    for experts, (ours, theirs) in models.items():
        steps[f"E{experts}_moelm_s"] = training_step(ours, [ids])
        steps[f"E{experts}_hf_s"] = training_step(theirs, [ids])
    results.update(interleaved_medians(steps, args.repeats))
    print(f"{'experts':>7} {'total M':>8} {'active M':>9} {'moelm s/step':>13} {'HF s/step':>10}")
    for experts, (ours, _) in models.items():
        print(
            f"{experts:>7} {ours.num_parameters() / 1e6:>8.1f} {ours.num_active_parameters() / 1e6:>9.1f} "
            f"{results[f'E{experts}_moelm_s']:>13.3f} {results[f'E{experts}_hf_s']:>10.3f}"
        )
    first, last = counts[0], counts[-1]
    results["moelm_scaling"] = results[f"E{last}_moelm_s"] / results[f"E{first}_moelm_s"]
    results["hf_scaling"] = results[f"E{last}_hf_s"] / results[f"E{first}_hf_s"]
    results["moelm_speedup_at_max_experts"] = results[f"E{last}_hf_s"] / results[f"E{last}_moelm_s"]
    print(
        f"step time {first} -> {last} experts: moelm {results['moelm_scaling']:.2f}x, HF {results['hf_scaling']:.2f}x"
    )
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
