"""Published checkpoint formats: DeepSeek's block-scaled FP8 weights and sharded directories, written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from moelm import MoELM
from moelm.model.hf import CheckpointError, parse_size

BLOCK = (24, 20)  # no tiny dimension is a multiple of both: every weight has partial edge blocks


def quantize_like_deepseek(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The test's own block quantiser, block by block: scale = amax / 448, fp8 = weight / scale."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale = torch.ones(grid)
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            piece = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            amax = piece.abs().max().item()
            scale[i, j] = amax / 448.0 if amax > 0 else 1.0
            quantized[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (piece / scale[i, j]).to(
                torch.float8_e4m3fn
            )
    return quantized, scale


def dequantize_like_deepseek(quantized: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = quantized.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] *= scale[i, j]
    return out


def write_fp8_checkpoint(tmp_path):
    """A tiny DeepseekV3 directory quantised by the test, and the same weights dequantised, unquantised."""
    torch.manual_seed(0)
    model = MoELM(tiny_config(initializer_range=0.2))
    model.save_pretrained(tmp_path / "plain")
    tensors = load_file(tmp_path / "plain" / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and name.endswith("proj.weight") and "shared_head" not in name:
            q, s = quantize_like_deepseek(tensor, BLOCK)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            dequantized[name] = dequantize_like_deepseek(q, s, BLOCK)
        else:
            quantized[name] = dequantized[name] = tensor
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    for folder, weights, extra in (
        ("fp8", quantized, {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(BLOCK)}}),
        ("reference", dequantized, {}),
    ):
        (tmp_path / folder).mkdir()
        save_file(weights, str(tmp_path / folder / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / folder / "config.json").write_text(json.dumps({**config, **extra}))
    return tmp_path / "fp8", tmp_path / "reference"


def test_fp8_block_scaled_weights_load_as_their_dequantised_values(tmp_path):
    fp8_dir, reference_dir = write_fp8_checkpoint(tmp_path)
    ours = MoELM.from_pretrained(fp8_dir, dtype=torch.float32)
    reference = MoELM.from_pretrained(reference_dir)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    scales = load_file(fp8_dir / "model.safetensors")["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"]
    assert len(set(scales.flatten().tolist())) > 1  # scales really differ per block
    assert MoELM.from_pretrained(fp8_dir).embed_tokens.weight.dtype == torch.bfloat16  # the default for FP8


def test_fp8_save_and_reload_is_exact(tmp_path):
    fp8_dir, _ = write_fp8_checkpoint(tmp_path)
    loaded = MoELM.from_pretrained(fp8_dir, dtype=torch.float32)
    loaded.save_pretrained(tmp_path / "again", quantization="fp8")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    stored = load_file(tmp_path / "again" / "model.safetensors")
    assert stored["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    assert stored["model.embed_tokens.weight"].dtype == torch.float32  # embeddings and norms stay unquantised
    reloaded = MoELM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    twice = MoELM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    reloaded.save_pretrained(tmp_path / "third", quantization="fp8")
    for name, tensor in MoELM.from_pretrained(tmp_path / "third", dtype=torch.float32).state_dict().items():
        assert torch.equal(tensor, twice.state_dict()[name]), name


def test_fp8_without_scales_or_with_a_wrong_block_size_names_the_tensor(tmp_path):
    fp8_dir, _ = write_fp8_checkpoint(tmp_path)
    tensors = load_file(fp8_dir / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [16, 16]
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"_scale_inv' has shape .* \(wrong weight_block_size"):
        MoELM.from_pretrained(fp8_dir)
    config["quantization_config"]["weight_block_size"] = list(BLOCK)
    (fp8_dir / "config.json").write_text(json.dumps(config))
    del tensors[name + "_scale_inv"]
    save_file(tensors, str(fp8_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"FP8 tensor '{name}' has no"):
        MoELM.from_pretrained(fp8_dir)


def test_sharded_directories_save_reload_and_name_a_missing_shard(tmp_path):
    model = MoELM(tiny_config())
    model.save_pretrained(tmp_path, max_shard_bytes="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    reloaded = MoELM.from_pretrained(tmp_path)
    assert all(torch.equal(t, reloaded.state_dict()[n]) for n, t in model.state_dict().items())
    (tmp_path / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=shards[1]):
        MoELM.from_pretrained(tmp_path)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 1024**3 and parse_size(7) == 7
    with pytest.raises(ValueError, match="invalid shard size"):
        parse_size("lots")


def test_info_reports_quantisation_and_files_and_dtype_flag_loads_bf16(tmp_path, capsys, monkeypatch):
    from conftest import save_tiny_model_with_tokenizer

    from moelm.cli import main
    from moelm.infer.text import TextGenerator

    model, _ = save_tiny_model_with_tokenizer(tmp_path)
    model.save_pretrained(tmp_path / "fp8", max_shard_bytes="20KB", quantization="fp8")
    assert main(["info", str(tmp_path / "fp8")]) == 0
    out = capsys.readouterr().out
    assert "quantisation:      FP8 e4m3, 128x128 block scales" in out and "architecture:      deepseek_v3" in out
    assert "weight files:      " in out and "weight files:      1 " not in out  # sharded
    loaded = []
    original = TextGenerator.from_pretrained.__func__

    def spy(cls, model_dir, dtype=None, device="cpu", **options):
        loaded.append(dtype)
        return original(cls, model_dir, dtype, device, **options)

    monkeypatch.setattr(TextGenerator, "from_pretrained", classmethod(spy))
    argv = ["generate", "--model", str(tmp_path), "--prompt", "the", "--max-new-tokens", "2", "--dtype", "bfloat16"]
    assert main(argv) == 0
    assert loaded == [torch.bfloat16]


LOAD_PEAK = """
import sys
from pathlib import Path
from moelm import MoELM
def status(key):
    return int(Path('/proc/self/status').read_text().split(key + ':')[1].split()[0]) * 1024
Path('/proc/self/clear_refs').write_text('5')  # reset the peak to the current resident set
before = status('VmRSS')
model = MoELM.from_pretrained(sys.argv[1])
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print((status('VmHWM') - before) / weights)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_loading_holds_about_one_copy_of_the_weights(tmp_path):
    """Tensors are read with plain reads into their final buffers (no memory map in the resident set)."""
    import subprocess
    import sys

    from moelm import load_config

    MoELM(load_config("small")).save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1.3, result.stdout  # a memory-mapped load measured 1.91 here
