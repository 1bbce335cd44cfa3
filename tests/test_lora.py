"""LoRA: adapters on attention, shared / dense SwiGLUs and routed experts; PEFT's directory format checked against
peft itself on transformers' DeepseekV3; LoRA fine-tuning, adapter-only checkpoints, exact resume, export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import randomize_lora_b, tiny_config

from moelm import MoELM, MoEOptions
from moelm.config import ConfigError
from moelm.data.builtin import builtin_corpus
from moelm.data.tokenizer import train_tokenizer
from moelm.model.hf import CheckpointError
from moelm.model.lora import (
    TARGETS,
    LoraSpec,
    attach_lora,
    lora_merged,
    lora_parameters,
    lora_state_dict,
    merge_lora,
)
from moelm.model.peft_format import AdapterError, load_adapter_into, save_adapter

ALL = LoraSpec(rank=4, alpha=8.0, targets=TARGETS)


def adapted_model(config=None, backend: str = "auto", seed: int = 0) -> MoELM:
    """A tiny model with every kind of adapter and non-zero B factors (a fresh adapter is an exact no-op)."""
    torch.manual_seed(seed)
    model = MoELM(config or tiny_config(n_shared_experts=1), MoEOptions(expert_backend=backend))
    attach_lora(model, ALL)
    randomize_lora_b(model, 0.05)
    return model


def test_fresh_adapters_change_nothing_and_only_they_train():
    torch.manual_seed(0)
    model = MoELM(tiny_config(n_shared_experts=1))
    ids = torch.randint(0, 97, (2, 12))
    before = model(ids).logits
    trainable = attach_lora(model, ALL)
    assert torch.equal(model(ids).logits, before)
    kinds = {name.split(".adapter.")[0].rsplit(".", 1)[-1] for name in lora_state_dict(model)}
    assert {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "experts", "gate_up_proj", "down_proj"} <= kinds
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model(ids, labels=ids).loss.backward()
    adapter_ids = {id(p) for p in lora_parameters(model)}
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (id(parameter) in adapter_ids), name


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_adapted_forward_equals_merged_weights(backend):
    model = adapted_model(backend=backend).train()
    ids = torch.randint(0, 97, (3, 10))
    adapted = model(ids).logits.detach()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), lora_merged(model):
        merged = model(ids).logits
        assert not lora_state_dict(model)  # the adapters are folded in for the block
    assert (adapted - merged).abs().max() < 1e-5
    for name, tensor in model.state_dict().items():  # restored bitwise, adapters back
        assert torch.equal(tensor, base[name]), name
    plain = merge_lora(model)
    assert not lora_state_dict(plain)
    assert (plain(ids).logits - adapted).abs().max() < 1e-5


def test_decode_paths_read_the_adapted_experts():
    """A token or two goes through the gathered expert path, which reads the banks directly."""
    model = adapted_model().eval()
    x = torch.randn(2, 32)
    layer = model.layers[1].mlp
    routing = layer.gate(x)
    with torch.no_grad():
        gathered = layer.experts(x, routing)  # <= 4 assignments, no grad: the per-assignment path
        rows, counts, plan = layer.experts.dispatcher.dispatch(x, routing)
        slabs = layer.experts.dispatcher.combine(layer.experts.compute(rows, counts), plan, x, routing)
    assert (gathered - slabs).abs().max() < 1e-6


def test_generation_with_attached_adapters_equals_the_merged_model():
    """Decoding reads weights directly (MLA's absorbed kv_b, the gathered experts): an attached adapter must
    reach those paths too, so greedy text is the merged model's without merging first."""
    from moelm.infer.generate import generate

    model = adapted_model(tiny_config(n_shared_experts=1, q_lora_rank=24), seed=2).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("_B"):
                parameter.mul_(10.0)  # large enough that an ignored adapter changes the text
    prompt = torch.randint(0, 97, (2, 6))
    attached = generate(model, prompt, max_new_tokens=12)
    with lora_merged(model):
        merged = generate(model, prompt, max_new_tokens=12)
    plain = MoELM(model.config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter." not in k})
    assert torch.equal(attached, merged) and not torch.equal(attached, generate(plain.eval(), prompt, 12))


def test_adapted_model_refuses_a_plain_save(tmp_path):
    with pytest.raises(CheckpointError, match="LoRA adapters"):
        adapted_model().save_pretrained(tmp_path / "m")


def test_peft_loads_the_adapter_onto_transformers_with_equal_logits(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import DeepseekV3ForCausalLM

    config = tiny_config(n_shared_experts=1, q_lora_rank=24)
    torch.manual_seed(1)
    base = MoELM(config).eval()
    base.save_pretrained(tmp_path / "base")
    model = adapted_model(config, seed=1).eval()
    model.load_state_dict(base.state_dict(), strict=False)  # the same base weights under the adapters
    save_adapter(model, ALL, tmp_path / "adapter", tmp_path / "base")
    ids = torch.randint(0, config.vocab_size, (2, 14))
    with torch.no_grad():
        ours = model(ids).logits
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
        assert (hf(ids).logits - base(ids).logits).abs().max() < 1e-4
        peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        theirs = peft_model(ids).logits
    assert (theirs - ours).abs().max() < 1e-4
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "LORA" and config_json["r"] == 4 and config_json["lora_alpha"] == 8.0
    # moelm reads its own file back to the same tensors, and from_pretrained merges it onto the base
    reread = MoELM.from_pretrained(tmp_path / "base")
    load_adapter_into(reread, tmp_path / "adapter")
    for name, tensor in lora_state_dict(model).items():
        assert torch.equal(tensor, lora_state_dict(reread)[name]), name
    merged = MoELM.from_pretrained(tmp_path / "adapter")
    assert (merged(ids).logits - ours).abs().max() < 1e-5


def test_adapter_config_names_only_the_kinds_the_model_has(tmp_path):
    torch.manual_seed(0)
    model = MoELM(tiny_config(n_shared_experts=0))
    attach_lora(model, ALL)  # shared_experts asked for, but the model has none
    save_adapter(model, ALL, tmp_path / "adapter", None)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not any("shared_experts" in name for name in written["target_parameters"])
    assert (
        "mlp.experts.gate_up_proj" in written["target_parameters"]
        and "mlp.gate_proj.weight" in written["target_parameters"]
    )
    reread = MoELM(model.config)
    assert load_adapter_into(reread, tmp_path / "adapter").targets == ("attention", "experts", "dense_mlp")


def test_adapter_directory_errors_name_the_problem(tmp_path):
    model = adapted_model()
    base = tmp_path / "base"
    MoELM(model.config).save_pretrained(base)
    save_adapter(model, ALL, tmp_path / "adapter", base)
    shutil.rmtree(base)
    with pytest.raises(AdapterError, match="base_model_name_or_path"):
        MoELM.from_pretrained(tmp_path / "adapter")
    other = MoELM(tiny_config(n_shared_experts=1, num_hidden_layers=3))
    with pytest.raises(AdapterError, match="matches no layer|no tensor"):
        load_adapter_into(other, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    raw = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**raw, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter_into(MoELM(model.config), tmp_path / "adapter")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([r.text for r in builtin_corpus(300, seed=3)], vocab_size=600)


def lora_recipe(*extra: str):
    from moelm.train.recipe import load_recipe

    return load_recipe(
        None,
        [
            "sft.sources=[{format: builtin, num_records: 300, domains: [math, logic]}]",
            "sft.val_examples=4",
            "sft.max_new_tokens=4",
            "data.seq_len=96",
            "train.max_steps=6",
            "train.batch_size=4",
            "train.save_every=3",
            "train.eval_every=3",
            "optim.lr=0.01",
            "log.progress=false",
            "lora.rank=4",
            *(() if "nodrop" in extra or any(e.startswith("lora.dropout") for e in extra) else ("lora.dropout=0.1",)),
            "lora.targets=[attention, experts, shared_experts, dense_mlp]",
            *(e for e in extra if e != "nodrop"),
        ],
    )


def test_lora_sft_trains_adapters_only_checkpoints_them_and_resumes_exactly(tmp_path, tokenizer):
    from moelm.train.sft import SFTTrainer

    base = tmp_path / "base"
    torch.manual_seed(0)
    MoELM(tiny_config(vocab_size=tokenizer.get_vocab_size(), eos_token_id=1, n_shared_experts=1)).save_pretrained(base)
    tokenizer.save(str(base / "tokenizer.json"))
    base_weights = {k: v.clone() for k, v in MoELM.from_pretrained(base).state_dict().items()}
    recipe = lora_recipe()
    kwargs = {"echo": lambda _: None, "base_model": base}
    straight_trainer = SFTTrainer(recipe, tmp_path / "straight", **kwargs)
    straight_adapters = None
    straight_trainer.run()
    out = tmp_path / "straight"
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "model").exists()
    assert (out / "adapter" / "tokenizer.json").is_file()
    for step in (3, 6):
        checkpoint = out / "checkpoints" / f"step-{step}"
        assert (checkpoint / "adapter" / "adapter_config.json").is_file() and not (checkpoint / "model").exists()
    tuned = MoELM.from_pretrained(out / "adapter")  # the base plus the trained adapters, merged
    assert any(not torch.equal(v, base_weights[k]) for k, v in tuned.state_dict().items())
    reloaded = MoELM.from_pretrained(base)
    straight_adapters = lora_state_dict(_with_adapter(reloaded, out / "adapter"))
    # killed after step 3, resumed: the adapters end bitwise where the straight run's end
    interrupted = tmp_path / "interrupted"
    SFTTrainer(recipe, interrupted, **kwargs).run()
    shutil.rmtree(interrupted / "checkpoints" / "step-6")
    shutil.rmtree(interrupted / "adapter")
    SFTTrainer(recipe, interrupted, **kwargs).run(resume=True)
    resumed = lora_state_dict(_with_adapter(MoELM.from_pretrained(base), interrupted / "adapter"))
    for name, tensor in straight_adapters.items():
        assert torch.equal(tensor, resumed[name]), name
    for name, tensor in MoELM.from_pretrained(base).state_dict().items():  # the base files are untouched
        assert torch.equal(tensor, base_weights[name]), name


def _with_adapter(model: MoELM, path) -> MoELM:
    load_adapter_into(model, path)
    return model


def test_lora_refuses_pretraining_and_bad_values(tmp_path):
    from moelm.train.recipe import load_recipe
    from moelm.train.trainer import Trainer

    with pytest.raises(ConfigError, match="lora.targets"):
        load_recipe(None, ["lora.targets=[mlp]"])
    with pytest.raises(ConfigError, match="lora.rank"):
        load_recipe(None, ["lora.rank=-1"])
    recipe = load_recipe(
        None, ["lora.rank=4", "train.max_steps=1", "data.builtin_records=50", "data.seq_len=32", "log.progress=false"]
    )
    with pytest.raises(ConfigError, match="lora.rank=4: LoRA adapts a base model"):
        Trainer(recipe, tmp_path / "out", echo=lambda _: None).run()


def test_export_merge_lora_writes_the_plain_model(tmp_path):
    model = adapted_model()
    base = tmp_path / "base"
    torch.manual_seed(0)
    plain_base = MoELM(model.config)
    plain_base.save_pretrained(base)
    model.load_state_dict(plain_base.state_dict(), strict=False)
    save_adapter(model, ALL, tmp_path / "adapter", base)

    def export(*args):
        return subprocess.run(
            [sys.executable, "-m", "moelm", "export", *args], capture_output=True, text=True, timeout=120
        )

    refused = export("--model", str(tmp_path / "adapter"), "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "--merge-lora" in refused.stderr and "Traceback" not in refused.stderr
    done = export("--model", str(tmp_path / "adapter"), "--merge-lora", "--out", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr
    ids = torch.randint(0, 97, (2, 9))
    merged = MoELM.from_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    with torch.no_grad():
        assert (merged(ids).logits - model.eval()(ids).logits).abs().max() < 1e-5


def test_server_serves_adapters_by_the_requests_model(tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from conftest import RunningServer, save_tiny_model_with_tokenizer

    from moelm.infer.text import TextGenerator
    from moelm.serve.app import ServerConfig, create_app

    base_dir = tmp_path / "base"
    base_model, tokenizer = save_tiny_model_with_tokenizer(base_dir)
    model = MoELM(base_model.config)
    model.load_state_dict(base_model.state_dict())
    torch.manual_seed(3)
    attach_lora(model, ALL)
    randomize_lora_b(model, 0.5)
    save_adapter(model, ALL, tmp_path / "adapter", base_dir)
    tokenizer.save(str(tmp_path / "adapter" / "tokenizer.json"))
    prompt, tokens = "the quick brown", 10
    base_text = "".join(TextGenerator.from_pretrained(base_dir).stream(prompt, tokens))
    adapted_text = "".join(TextGenerator.from_pretrained(tmp_path / "adapter").stream(prompt, tokens))
    assert base_text != adapted_text  # the adapter changes what the model says
    config = ServerConfig("tiny", adapters={"math": tmp_path / "adapter"})
    running = RunningServer(create_app(TextGenerator.from_pretrained(base_dir), config))
    try:

        def complete(name: str) -> httpx.Response:
            body = {"model": name, "prompt": prompt, "max_tokens": tokens, "temperature": 0}
            return httpx.post(f"{running.url}/v1/completions", json=body, timeout=60)

        assert complete("tiny").json()["choices"][0]["text"] == base_text
        reply = complete("math").json()
        assert reply["choices"][0]["text"] == adapted_text and reply["model"] == "math"
        missing = complete("nope")
        assert missing.status_code == 404 and "'math'" in missing.json()["error"]["message"]
        cards = httpx.get(f"{running.url}/v1/models").json()["data"]
        assert [c["id"] for c in cards] == ["tiny", "math"] and cards[1]["parent"] == "tiny"
    finally:
        running.stop()


def test_lora_grpo_raises_the_reward_and_writes_only_the_adapter(tmp_path):
    from conftest import addition_task

    from moelm.train.grpo import GRPOTrainer
    from moelm.train.recipe import load_recipe

    overrides = addition_task(tmp_path)
    # A frozen random head of the usual small init bounds the logits too tightly for any adapter to move them;
    # a base with a larger init is one an adapter can steer (full fine-tuning trains the head itself).
    torch.manual_seed(0)
    MoELM(MoELM.from_pretrained(tmp_path / "base").config.replace(initializer_range=0.2)).save_pretrained(
        tmp_path / "base"
    )
    overrides = [
        *overrides,
        "train.max_steps=40",
        "train.log_every=1",
        "train.eval_every=40",
        "lora.rank=8",
        "optim.lr=3e-2",
        "grpo.beta=0.04",  # the reference is the frozen base, held beside the adapted policy
    ]
    run = tmp_path / "run"
    GRPOTrainer(load_recipe(None, overrides), run, echo=lambda _: None, base_model=tmp_path / "base").run()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward"] for r in records[:10]) / 10
    last = sum(r["reward"] for r in records[-10:]) / 10
    assert last >= first + 0.1, (first, last)
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "model").exists()
    trained = lora_state_dict(_with_adapter(MoELM.from_pretrained(tmp_path / "base"), run / "adapter"))
    assert any(name.endswith("_B") and tensor.abs().max() > 0 for name, tensor in trained.items())


def test_export_merge_lora_as_gguf_writes_the_merged_weights(tmp_path):
    gguf = pytest.importorskip("gguf")
    from conftest import save_tiny_model_with_tokenizer

    from moelm.cli import main

    base, tokenizer = save_tiny_model_with_tokenizer(tmp_path / "base")
    model = MoELM(base.config)
    model.load_state_dict(base.state_dict())
    attach_lora(model, ALL)
    randomize_lora_b(model, 0.3)
    save_adapter(model, ALL, tmp_path / "adapter", tmp_path / "base")
    argv = ["export", "--model", str(tmp_path / "adapter"), "--merge-lora", "--format", "gguf"]
    assert main([*argv, "--out", str(tmp_path / "m.gguf")]) == 2  # no tokenizer.json beside the adapter
    tokenizer.save(str(tmp_path / "adapter" / "tokenizer.json"))
    assert main([*argv, "--out", str(tmp_path / "m.gguf")]) == 0
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}["blk.1.attn_output.weight"]
    merged = merge_lora(model).layers[1].self_attn.o_proj.weight
    values = torch.from_numpy(stored.data.copy()).reshape(merged.shape)
    assert torch.allclose(values, merged) and not torch.allclose(values, base.layers[1].self_attn.o_proj.weight)


def test_lora_recipe_keys_reach_the_trainers_adapters(tmp_path, tokenizer):
    """lora.alpha sets the scaling, lora.targets which layers are adapted, lora.dropout makes the adapted forward
    stochastic in training (and only there)."""
    from moelm.model.lora import adapted_modules
    from moelm.train.sft import SFTTrainer

    base = tmp_path / "base"
    torch.manual_seed(0)
    MoELM(tiny_config(vocab_size=tokenizer.get_vocab_size(), eos_token_id=1, n_shared_experts=1)).save_pretrained(base)
    tokenizer.save(str(base / "tokenizer.json"))

    def adapters(*extra: str) -> SFTTrainer:
        trainer = SFTTrainer(lora_recipe(*extra), tmp_path / f"out{len(extra)}", echo=lambda _: None, base_model=base)
        trainer.setup()
        return trainer

    trainer = adapters("nodrop", "lora.alpha=32", "lora.targets=[experts]")
    adapted = dict(adapted_modules(trainer.model))
    assert set(adapted) == {"layers.1.mlp.experts"} and adapted["layers.1.mlp.experts"].adapter.scaling == 8.0
    randomize_lora_b(trainer.model, 0.1)
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 10))
    model = trainer.model.train()
    assert torch.equal(model(ids).logits, model(ids).logits)  # no dropout asked: deterministic
    dropped = adapters("lora.dropout=0.5").model.train()
    randomize_lora_b(dropped, 0.1)
    assert not torch.equal(dropped(ids).logits, dropped(ids).logits)
    assert torch.equal(dropped.eval()(ids).logits, dropped(ids).logits)


def test_serve_lora_flag_errors_name_the_value(tmp_path, capsys):
    pytest.importorskip("fastapi")
    from conftest import save_tiny_model_with_tokenizer

    from moelm.cli import main

    save_tiny_model_with_tokenizer(tmp_path / "base")
    for value, message in (
        ("math", "expected NAME=DIR"),
        (f"math={tmp_path / 'base'}", "is not a LoRA adapter directory"),
        (f"base={tmp_path / 'base'}", "is already served"),
    ):
        assert main(["serve", "--model", str(tmp_path / "base"), "--lora", value]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
