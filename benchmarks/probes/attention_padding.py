"""Why MLA values are zero-padded: SDPA with v_head_dim < qk_head_dim falls back to the unfused math path.

Times causal SDPA on MLA-shaped tensors (tiny: qk 48 / v 32, small: qk 96 / v 64; batch 8 x 256) as given and
with values padded to the query width (the slice-off included), checks both agree, prints the speed-up.

    python benchmarks/probes/attention_padding.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import median_seconds  # noqa: E402


def median_ms(fn, repeats: int = 10) -> float:  # noqa: ANN001
    return median_seconds(fn, repeats) * 1000


def main() -> None:
    results: dict[str, float] = {}
    for name, heads, qk, v in (("tiny", 4, 48, 32), ("small", 8, 96, 64)):
        q, k = torch.randn(8, heads, 256, qk), torch.randn(8, heads, 256, qk)
        values = torch.randn(8, heads, 256, v)
        plain = lambda: F.scaled_dot_product_attention(q, k, values, is_causal=True)  # noqa: B023, E731
        padded = lambda: F.scaled_dot_product_attention(q, k, F.pad(values, (0, qk - v)), is_causal=True)[..., :v]  # noqa: B023, E731
        torch.testing.assert_close(plain(), padded(), atol=1e-5, rtol=1e-5)
        results[f"{name}_unpadded_ms"] = median_ms(plain)
        results[f"{name}_padded_ms"] = median_ms(padded)
        results[f"{name}_speedup"] = results[f"{name}_unpadded_ms"] / results[f"{name}_padded_ms"]
        print(f"{name}: unpadded {results[f'{name}_unpadded_ms']:.1f} ms, padded {results[f'{name}_padded_ms']:.1f} ms")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
