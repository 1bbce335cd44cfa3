"""Serving under load, measured from the client side as vLLM's benchmark_serving does, against offline generate.

A random small-preset model (float32) is saved with a tokenizer, `python -m moelm serve` runs it in a child
process, and for each concurrency level N (1, 4, 16, 64) N streaming clients each send the same number of
requests with fixed prompt and output lengths (token-id prompts, `ignore_eos`, and `logprobs: 0` so that every
token arrives as its own chunk). Per request: TTFT, TPOT = (E2EL - TTFT) / (output tokens - 1), every
inter-token gap (ITL) and E2EL; per level: percentiles and the aggregate output tokens/s. The baseline is offline
`generate` at batch 16 on the same prompts in this process, timed while the server is idle, so "server /
offline" at 16 streams is the serving overhead.

    python benchmarks/serve_load.py [--preset small --prompt-len 64 --output-len 64 --levels 1,4,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from moelm import MoELM, load_config
from moelm.data.tokenizer import save_tokenizer_file, train_tokenizer
from moelm.infer import generate
from moelm.infer.compiled import CompiledDecode, compile_decode


def percentiles(values: list[float]) -> dict[str, float]:
    """Mean, median, p90 and p99 in milliseconds."""
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "mean_ms": round(statistics.fmean(values) * 1e3, 2),
        "p50_ms": round(statistics.median(values) * 1e3, 2),
        "p90_ms": round(at(0.90) * 1e3, 2),
        "p99_ms": round(at(0.99) * 1e3, 2),
    }


async def one_request(client: httpx.AsyncClient, prompt: list[int], output_len: int) -> dict:
    body = {
        "model": "bench",
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "logprobs": 0,  # one chunk per token even where a random model's token decodes to no text
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["logprobs"]:
                arrivals.extend([time.perf_counter()] * len(chunk["choices"][0]["logprobs"]["tokens"]))
    end = time.perf_counter()
    ttft = arrivals[0] - start if arrivals else end - start
    return {
        "ttft": ttft,
        "e2el": end - start,
        "tpot": (end - start - ttft) / max(tokens - 1, 1),
        "itl": [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)],
        "tokens": tokens,
    }


async def load_level(url: str, prompts: list[list[int]], concurrency: int, output_len: int, per_client: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker(w: int) -> list[dict]:
            return [
                await one_request(client, prompts[(w * per_client + i) % len(prompts)], output_len)
                for i in range(per_client)
            ]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(concurrency))) for r in rs]
        elapsed = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tok_s": round(tokens / elapsed, 1),
        "ttft": percentiles([r["ttft"] for r in results]),
        "tpot": percentiles([r["tpot"] for r in results]),
        "itl": percentiles([g for r in results for g in r["itl"]]),
        "e2el": percentiles([r["e2el"] for r in results]),
    }


def offline_tokens_per_second(
    model: MoELM, prompts: list[list[int]], output_len: int, repeats: int = 2, compiled: CompiledDecode | None = None
) -> float:
    """Offline batched greedy generation of every prompt at once (the ceiling the server is held to)."""
    ids = torch.tensor(prompts)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, ids, output_len, eos_token_id=None, compiled=compiled)
        best = max(best, len(prompts) * output_len / (time.perf_counter() - start))
    return best


EXTRA_ENV = json.loads(os.environ.get("SERVE_ENV", "{}"))


def start_server(model_dir: Path, port: int, max_batch: int, compile_step: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "moelm", "serve", "--model", str(model_dir), "--port", str(port)]
    command += ["--served-model-name", "bench", "--max-batch", str(max_batch), "--log-level", "warning"]
    command += ["--compile"] if compile_step else []
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, env={**os.environ, **EXTRA_ENV})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="server and offline baseline decode through compiled steps (each level is run once untimed first, "
        "so the graphs of its batch and cache buckets are built or loaded outside the timing)",
    )
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    torch.manual_seed(0)
    tokenizer = train_tokenizer(["a small corpus for a benchmark tokenizer"] * 10, vocab_size=300)
    config = load_config(args.preset)
    model = MoELM(config).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(300, config.vocab_size, (args.prompt_len,), generator=generator).tolist() for _ in range(64)
    ]
    with tempfile.TemporaryDirectory() as directory:
        model_dir = Path(directory)
        model.save_pretrained(model_dir)
        save_tokenizer_file(tokenizer, model_dir / "tokenizer.json")
        compiled = compile_decode(model) if args.compile else None
        offline = offline_tokens_per_second(model, prompts[:16], args.output_len, compiled=compiled)
        server = start_server(model_dir, args.port, max(levels + [16]), args.compile)
        try:
            url = f"http://127.0.0.1:{args.port}"
            asyncio.run(load_level(url, prompts, 2, 4, 1))  # warm-up
            for n in levels if args.compile else []:
                asyncio.run(load_level(url, prompts, n, args.output_len, 1))
            results = [
                asyncio.run(load_level(url, prompts, n, args.output_len, args.requests_per_client)) for n in levels
            ]
            offline_after = offline_tokens_per_second(model, prompts[:16], args.output_len, compiled=compiled)
        finally:
            server.terminate()
            server.wait(timeout=30)
    offline = max(offline, offline_after)
    at16 = next((r["output_tok_s"] for r in results if r["concurrency"] == 16), None)
    for r in results:
        print(
            f"N={r['concurrency']:>3}  {r['output_tok_s']:>7.1f} tok/s  TTFT p50 {r['ttft']['p50_ms']:>8.1f} ms  "
            f"TPOT p50 {r['tpot']['p50_ms']:>7.1f} ms  ITL p99 {r['itl'].get('p99_ms', 0):>7.1f} ms",
            file=sys.stderr,
        )
    summary = {
        "preset": args.preset,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "offline_generate_batch16_tok_s": round(offline, 1),
        "server_16_streams_over_offline": round(at16 / offline, 3) if at16 else None,
        "levels": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
