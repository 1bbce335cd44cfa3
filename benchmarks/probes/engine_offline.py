"""Two numbers behind the serving section of the README, in one run (small preset, float32, random weights):

1. One MoE layer's eager decode of T tokens: every expert on every token (the old path) against the sorted
   dispatch over the experts the tokens touch (the path `decode` takes now), ms per call, T = 1, 4, 16, 64.
2. The continuous-batching engine without HTTP against offline `generate`, 16 prompts of 64 tokens -> 32 new
   tokens each, timed in turn for a few rounds (tokens/s per round), so the server's gap can be split into
   engine and HTTP/CPU-sharing parts.

    python benchmarks/probes/engine_offline.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch
import torch.nn.functional as F

from moelm import MoELM, load_config
from moelm.infer import generate
from moelm.infer.engine import Engine, EngineRequest


def every_expert(experts, x_TH: torch.Tensor, routing) -> torch.Tensor:  # noqa: ANN001
    """The former eager decode: all E experts on all T tokens, combined with the routing weights."""
    combine_TE = torch.zeros(x_TH.shape[0], experts.num_experts).scatter(1, routing.expert_ids_TK, routing.weights_TK)
    gate, up = (x_TH @ experts.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    out_ETH = (F.silu(gate) * up) @ experts.down_proj.transpose(1, 2)
    return torch.einsum("te,eth->th", combine_TE, out_ETH)


def median_ms(fn, repeats: int = 15) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config("small")
    model = MoELM(config).eval()
    moe = model.layers[config.first_k_dense_replace].mlp
    layer = {}
    with torch.inference_mode():
        for tokens in (1, 4, 16, 64):
            x = torch.randn(tokens, config.hidden_size)
            routing = moe._route(x)
            torch.testing.assert_close(moe.experts.decode(x, routing), every_expert(moe.experts, x, routing))
            layer[tokens] = {
                "every_expert_ms": median_ms(lambda x=x, r=routing: every_expert(moe.experts, x, r)),
                "sorted_dispatch_ms": median_ms(lambda x=x, r=routing: moe.experts.decode(x, r)),
            }
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (64,), generator=generator).tolist() for _ in range(16)]
    engine = Engine(model, [], max_batch=16, max_model_len=256).start()

    def offline() -> float:
        start = time.perf_counter()
        generate(model, torch.tensor(prompts), 32, eos_token_id=None)
        return 16 * 32 / (time.perf_counter() - start)

    def through_engine() -> float:
        done = threading.Semaphore(0)
        start = time.perf_counter()
        for prompt in prompts:
            engine.submit(
                EngineRequest(prompt, 32, lambda e: done.release() if e.finish_reason else None, ignore_eos=True)
            )
        for _ in prompts:
            done.acquire()
        return 16 * 32 / (time.perf_counter() - start)

    rounds = [(offline(), through_engine()) for _ in range(args.rounds)]
    engine.stop()
    print(
        json.dumps(
            {
                "moe_layer_decode": layer,
                "offline_generate_tok_s": [round(o, 1) for o, _ in rounds],
                "engine_tok_s": [round(e, 1) for _, e in rounds],
            }
        )
    )


if __name__ == "__main__":
    main()
