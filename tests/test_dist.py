"""Scale-out on torch.distributed, on CPU with gloo: 2 processes started by torchrun against one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import pretrain_command, tiny_config

from moelm import MoELM
from moelm.devices import DeviceError, resolve_device
from moelm.dist.runtime import ParallelSetupError, init_parallel

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def torchrun(ranks: int) -> list[str]:
    return [*TORCHRUN[:-1], str(ranks)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)


def pretrain(out, steps: int, *extra: str, ranks: int = 1, resume: bool = False) -> subprocess.CompletedProcess:
    command = pretrain_command(out, steps, "train.save_every=2", *extra) + (["--resume"] if resume else [])
    if ranks > 1:
        command = [*torchrun(ranks), "-m", "moelm", *command[3:]]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(directory) -> dict[str, torch.Tensor]:
    return MoELM.from_pretrained(directory).state_dict()


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_model(a, b, atol: float = 1e-4) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    worst = max((first[k].float() - second[k].float()).abs().max().item() for k in first)
    assert worst < atol, worst


WORKER = str(Path(__file__).with_name("dist_worker.py"))
STEP = ["moe.bias_update_rate=0.01", "train.grad_accum=2"]


def one_step(tmp_path, name: str, *overrides: str, ranks: int = 1) -> dict:
    result = tmp_path / f"{name}.pt"
    command = [WORKER, str(tmp_path / name), str(result), *STEP, *overrides]
    command = [*torchrun(ranks), *command] if ranks > 1 else [sys.executable, *command]
    completed = run(command)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(result, weights_only=True) if result.is_file() else {}  # else per pipeline stage


@pytest.fixture(scope="module")
def single_step(tmp_path_factory):
    return one_step(tmp_path_factory.mktemp("single"), "single")


@pytest.mark.parametrize(
    "parallel",
    [
        ["parallel.fsdp=true"],
        ["parallel.expert_degree=2", "parallel.fsdp=false"],
        ["parallel.expert_degree=2", "parallel.fsdp=true"],
        ["parallel.fsdp=false"],
        ["parallel.fsdp=true", "parallel.reshard_after_forward=false"],
    ],
    ids=["fsdp", "ep2", "ep2+fsdp", "replicated", "fsdp-no-reshard"],
)
def test_one_step_on_two_ranks_has_the_gradients_of_one_process(single_step, tmp_path, parallel):
    """Same global batch (2 micro-batches, each split over the ranks): loss, every gradient, the clipped norm
    and the aux-free bias update equal the one-process step."""
    step = one_step(tmp_path, "two", *parallel, ranks=2)
    assert step["loss"] == pytest.approx(single_step["loss"], rel=1e-5)
    assert step["grad_norm"] == pytest.approx(single_step["grad_norm"], rel=1e-5)
    assert step["grads"].keys() == single_step["grads"].keys()
    for name, grad in single_step["grads"].items():
        torch.testing.assert_close(step["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)
    for name, bias in single_step["biases"].items():
        assert bias.abs().sum() > 0
        torch.testing.assert_close(step["biases"][name], bias, atol=0, rtol=0, msg=name)


def test_four_ranks_start_from_the_weights_of_one_process_and_take_its_step(single_step, tmp_path):
    """Built on meta and seeded per tensor: FSDP x EP2 on 4 ranks draws each rank's shards only, and the gathered
    initial weights equal the one-process model bit for bit; the step's gradients equal the one-process step."""
    step = one_step(tmp_path, "four", "parallel.expert_degree=2", "parallel.fsdp=true", ranks=4)
    assert step["initial"].keys() == single_step["initial"].keys()
    for name, value in single_step["initial"].items():
        assert torch.equal(step["initial"][name], value), name
    assert step["loss"] == pytest.approx(single_step["loss"], rel=1e-5)
    for name, grad in single_step["grads"].items():
        torch.testing.assert_close(step["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_bf16_fsdp_gathers_bf16_parameters_and_matches_one_process(tmp_path):
    """train.dtype=bfloat16: FSDP2's MixedPrecisionPolicy gathers bf16 weights (the block sees bf16 inside its
    forward) and reduces float32 gradients into float32 shards; the step equals one process under autocast."""
    single = one_step(tmp_path, "one", "train.dtype=bfloat16")
    two = one_step(tmp_path, "two", "train.dtype=bfloat16", "parallel.fsdp=true", "parallel.expert_degree=2", ranks=2)
    assert single["gathered_dtype"] == "torch.float32"  # one process: float32 master weights, autocast casts
    assert two["gathered_dtype"] == "torch.bfloat16"
    assert two["loss"] == pytest.approx(single["loss"], rel=1e-3)
    assert two["grad_norm"] == pytest.approx(single["grad_norm"], rel=2e-2)
    for name, grad in single["grads"].items():
        assert two["grads"][name].dtype == torch.float32
        torch.testing.assert_close(two["grads"][name], grad, atol=2e-3, rtol=5e-2, msg=name)


# Pipeline stages need blocks to cut (4) and no MTP (it reads the embedding on the last stage).
PIPELINE = ["model.num_nextn_predict_layers=0", "model.num_hidden_layers=4"]


def pipeline_step(tmp_path, name: str, *overrides: str, ranks: int) -> dict:
    """One step under pipelining: every stage's part (written by its first data-parallel rank) merged."""
    one_step(tmp_path, name, *overrides, ranks=ranks)
    parts = [torch.load(path, weights_only=True) for path in sorted(tmp_path.glob(f"{name}.pt.stage*"))]
    merged = {**parts[-1], "grads": {}, "initial": {}, "biases": {}}
    for part in parts:
        for key in ("grads", "initial", "biases"):
            assert not merged[key].keys() & part[key].keys()  # every tensor lives on one stage
            merged[key].update(part[key])
    assert all(part["loss"] == merged["loss"] for part in parts)  # every stage logs the pipeline's loss
    return merged


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory):
    """One process, 4 micro-batches, the balance losses on (they enter the backward on every stage)."""
    path = tmp_path_factory.mktemp("pipeline")
    return {
        "aux": one_step(path, "aux", *PIPELINE, "train.grad_accum=4", "moe.aux_loss_alpha=0.01"),
        "plain": one_step(path, "plain", *PIPELINE, "train.grad_accum=4"),
    }


def assert_same_step(step: dict, reference: dict, rel: float = 1e-5) -> None:
    assert step["loss"] == pytest.approx(reference["loss"], rel=rel)
    assert step["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)
    assert step["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
    assert step["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(step["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)
    for name, value in reference["initial"].items():
        assert torch.equal(step["initial"][name], value), name
    for name, bias in reference["biases"].items():
        torch.testing.assert_close(step["biases"][name], bias, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize(
    "schedule",
    [
        ["parallel.pipeline_schedule=1f1b"],
        ["parallel.pipeline_schedule=interleaved_1f1b"],
        ["parallel.pipeline_schedule=dualpipev", "parallel.fsdp=false"],
    ],
    ids=["1f1b", "interleaved", "dualpipev"],
)
def test_two_pipeline_stages_take_the_step_of_one_process(pipeline_reference, tmp_path, schedule):
    """PP2 (one rank per stage, 4 micro-batches): seeded init, the evaluation forward, the balance losses of both
    stages, every gradient, the clipped norm and the bias update equal the one-process step."""
    step = pipeline_step(
        tmp_path,
        "pp",
        *PIPELINE,
        "train.grad_accum=4",
        "moe.aux_loss_alpha=0.01",
        "parallel.pipeline_degree=2",
        *schedule,
        ranks=2,
    )
    assert_same_step(step, pipeline_reference["aux"])
    assert step["record"]["aux_loss"] == pytest.approx(pipeline_reference["aux"]["record"]["aux_loss"], rel=1e-6)


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.expert_degree=2"],
        pytest.param(["parallel.pipeline_schedule=interleaved_1f1b"], marks=pytest.mark.slow),
    ],
    ids=["pp2xep2xfsdp", "pp2xfsdp2-interleaved"],
)
def test_pipeline_stages_compose_with_expert_parallelism_and_fsdp_on_four_ranks(pipeline_reference, tmp_path, layout):
    """PP2 x (EP2 or FSDP over 2): each stage's two ranks split the batch; the step equals one process's
    (without balance losses, which data parallelism computes per rank's rows)."""
    step = pipeline_step(
        tmp_path, "pp", *PIPELINE, "train.grad_accum=4", "parallel.pipeline_degree=2", *layout, ranks=4
    )
    assert_same_step(step, pipeline_reference["plain"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "model.num_nextn_predict_layers=0"),
        (["model.num_nextn_predict_layers=0", "train.grad_accum=1"], "train.grad_accum >= 2"),
        pytest.param(
            ["model.num_nextn_predict_layers=0", "parallel.pipeline_schedule=dualpipev"],
            "parallel.fsdp=false",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["mtp", "too-few-micro-batches", "dualpipev-fsdp"],
)
def test_pipeline_layouts_that_cannot_work_fail_with_one_line(tmp_path, extra, message):
    command = pretrain_command(tmp_path / "run", 2, "parallel.pipeline_degree=2", *extra)
    result = run([*torchrun(2), "-m", "moelm", *command[3:]])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("moelm: error:")]
    assert errors and message in errors[0], result.stderr[-2000:]  # the workers' one line (torchrun adds its own)


def test_a_pipeline_needs_a_block_for_every_stage():
    from moelm.config import ConfigError
    from moelm.dist.pipeline import plan_stages

    with pytest.raises(ConfigError, match="needs 4 stages of at least one block"):
        plan_stages(3, 2, "dualpipev")
    interleaved = plan_stages(6, 2, "interleaved_1f1b", virtual_stages=3)
    assert [plan.rank for plan in interleaved] == [0, 1, 0, 1, 0, 1]
    assert [list(plan.layers) for plan in interleaved] == [[0], [1], [2], [3], [4], [5]]
    v_shape = plan_stages(5, 2, "dualpipev")
    assert [plan.rank for plan in v_shape] == [0, 1, 1, 0]
    assert [len(plan.layers) for plan in v_shape] == [2, 1, 1, 1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference run for the checkpoint tests: 4 steps in one process."""
    out = tmp_path_factory.mktemp("single") / "run"
    pretrain(out, 4, "moe.bias_update_rate=0.01", "train.log_every=1")
    return out


def test_four_steps_on_two_ranks_end_at_the_loss_of_one_process(single, tmp_path):
    out = tmp_path / "run"
    pretrain(out, 4, "moe.bias_update_rate=0.01", "train.log_every=1", "parallel.expert_degree=2", ranks=2)
    assert losses(out) == pytest.approx(losses(single), rel=1e-4)
    assert (out / "model" / "model.safetensors").is_file() and (out / "checkpoints" / "step-4").is_dir()


def test_checkpoints_reshard_between_two_ranks_and_one(single, tmp_path):
    """Saved on 2 ranks at step 2 (sharded), resumed on 1; saved in one process (a model directory), resumed on 4
    ranks: both runs end where the one-process run does."""
    two_then_one = tmp_path / "a"
    pretrain(two_then_one, 2, "moe.bias_update_rate=0.01", "parallel.expert_degree=2", ranks=2)
    pretrain(two_then_one, 4, "moe.bias_update_rate=0.01", "train.log_every=1", resume=True)
    assert_same_model(two_then_one / "model", single / "model")
    one_then_four = tmp_path / "b"
    pretrain(one_then_four, 2, "moe.bias_update_rate=0.01")
    pretrain(one_then_four, 4, "moe.bias_update_rate=0.01", "parallel.expert_degree=2", ranks=4, resume=True)
    assert_same_model(one_then_four / "model", single / "model")


PIPELINE_RUN = [*PIPELINE, "moe.bias_update_rate=0.01", "train.grad_accum=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def pipeline_single(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline-single") / "run"
    pretrain(out, 4, *PIPELINE_RUN)
    return out


@pytest.mark.slow  # ~60 s: three runs; the PP parity tests above cover the step
def test_a_pipelined_run_checkpoints_and_resumes_across_layouts(pipeline_single, tmp_path):
    """`moelm train` on 2 pipeline stages logs the one-process losses and exports the one-process model; its
    step-2 sharded checkpoint (each stage wrote its own blocks) resumes in one process, and a one-process
    checkpoint resumes on PP2 x EP2 (4 ranks): all three end at the one-process weights."""
    out = tmp_path / "pp"
    pretrain(out, 4, *PIPELINE_RUN, "parallel.pipeline_degree=2", ranks=2)
    assert losses(out) == pytest.approx(losses(pipeline_single), rel=1e-4)
    assert_same_model(out / "model", pipeline_single / "model")
    assert json.loads((out / "run.json").read_text())["world"]["pipeline_degree"] == 2
    resumed = tmp_path / "pp-then-one"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    shutil.rmtree(resumed / "model")
    pretrain(resumed, 4, *PIPELINE_RUN, resume=True)
    assert_same_model(resumed / "model", pipeline_single / "model")
    one_then_pp = tmp_path / "one-then-pp"
    pretrain(one_then_pp, 2, *PIPELINE_RUN)
    pretrain(
        one_then_pp, 4, *PIPELINE_RUN, "parallel.pipeline_degree=2", "parallel.expert_degree=2", ranks=4, resume=True
    )
    assert_same_model(one_then_pp / "model", pipeline_single / "model")


DCP_WORKER = str(Path(__file__).with_name("dcp_worker.py"))
BIAS = "moe.bias_update_rate=0.01"


@pytest.mark.slow
def test_sharded_checkpoints_reshard_from_four_ranks_to_two_to_one(single, tmp_path):
    """Each rank writes its own shards (no model directory in the checkpoint); FSDP x EP2 on 4 ranks resumes on 2
    ranks without expert parallelism, then in one process, and ends at the one-process weights. The step-4
    checkpoint exports, one tensor at a time, to the one-process model."""
    out = tmp_path / "run"
    pretrain(out, 2, BIAS, "parallel.expert_degree=2", ranks=4)
    step_2 = out / "checkpoints" / "step-2"
    assert (step_2 / "shards" / ".metadata").is_file() and not (step_2 / "model").exists()
    assert len(list((step_2 / "shards").glob("*.distcp"))) == 4
    pretrain(out, 4, BIAS, "parallel.fsdp=true", ranks=2, resume=True)
    exported = tmp_path / "exported"
    result = run(
        [
            sys.executable,
            "-m",
            "moelm",
            "export",
            "--checkpoint",
            str(out / "checkpoints" / "step-4"),
            "--out",
            str(exported),
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_model(exported, single / "model")
    assert (exported / "tokenizer.json").is_file()
    pretrain(out, 6, BIAS, resume=True)
    reference = tmp_path / "reference"
    pretrain(reference, 6, BIAS)
    assert_same_model(out / "model", reference / "model")


def test_a_rank_killed_during_a_sharded_save_leaves_the_previous_checkpoint_resumable(single, tmp_path):
    out = tmp_path / "run"
    command = [
        *TORCHRUN,
        DCP_WORKER,
        "die-in-save",
        str(out),
        "4",
        "4",
        BIAS,
        "train.save_every=2",
        "parallel.timeout_s=20",
    ]
    assert run(command).returncode != 0
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step-2" in checkpoints and "step-4" not in checkpoints, checkpoints
    pretrain(out, 4, BIAS, ranks=2, resume=True)
    assert_same_model(out / "model", single / "model")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads resident memory from /proc")
def test_rank_zero_memory_during_a_four_rank_save_and_load_stays_below_its_share(tmp_path):
    """Rank 0's resident memory rises by at most 0.4x the full training state while 4 ranks save a sharded
    checkpoint and load it back (a gathered save needed the whole state, 1x, on rank 0)."""
    result = tmp_path / "memory.json"
    size = [
        "model.hidden_size=256",
        "model.moe_intermediate_size=256",
        "model.intermediate_size=512",
        "model.num_hidden_layers=4",
        "model.kv_lora_rank=64",
        "train.batch_size=4",
        "data.seq_len=32",
    ]
    command = [
        *torchrun(4),
        DCP_WORKER,
        "memory",
        str(tmp_path / "run"),
        str(result),
        *size,
        "parallel.fsdp=true",
        "parallel.expert_degree=2",
    ]
    completed = run(command, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    measured = json.loads(result.read_text())
    assert measured["full_state"] > 64 * 2**20, measured  # large enough that the sampling noise is small
    assert measured["gathered"] >= 0.8 * measured["full_state"], measured  # the sampler sees a gathered state
    assert measured["save"] <= 0.4 * measured["full_state"], measured
    assert measured["load"] <= 0.4 * measured["full_state"], measured


def test_expert_degree_that_does_not_divide_fails_on_every_rank_with_one_line(tmp_path):
    command = [*TORCHRUN, "-m", "moelm", *pretrain_command(tmp_path / "x", 2, "parallel.expert_degree=4")[3:]]
    result = run(command, timeout=120)
    assert result.returncode != 0
    assert "parallel.expert_degree=4 must divide the world size 2" in result.stderr


def test_expert_degree_must_divide_the_experts():
    command = pretrain_command("unused", 2, "parallel.expert_degree=3")
    result = run(command, timeout=60)
    assert result.returncode == 2 and "must be a divisor of model.n_routed_experts=8" in result.stderr


def test_missing_rendezvous_variables_are_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ParallelSetupError, match="'RANK'.*launch with torchrun"):
        init_parallel("cpu")


def test_expert_parallelism_needs_torchrun():
    with pytest.raises(ParallelSetupError, match="needs 2 processes"):
        init_parallel("cpu", expert_degree=2)


# ---------------------------------------------------------------------------------------------- devices
def test_device_selection_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_device_selection_with_cuda_follows_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="cuda:2 does not exist: this machine has 2"):
        resolve_device("cuda:2")


def test_device_flags_are_validated_before_loading(tmp_path):
    MoELM(tiny_config()).save_pretrained(tmp_path)
    result = run(
        [sys.executable, "-m", "moelm", "generate", "--model", str(tmp_path), "--prompt", "x", "--device", "tpu"]
    )
    assert result.returncode == 2 and "--device" in result.stderr
    result = run(
        [sys.executable, "-m", "moelm", "generate", "--model", str(tmp_path), "--prompt", "x", "--device", "cuda"]
    )
    assert result.returncode == 2 and "no CUDA device" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- failures
def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _start(out, steps: int, *extra: str, resume: bool = False) -> subprocess.Popen:
    command = pretrain_command(out, steps, "train.save_every=2", *extra) + (["--resume"] if resume else [])
    command = [*TORCHRUN, "-m", "moelm", *command[3:]]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    import time

    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


PROBE_EXIT = """
import atexit, sys
import torch.distributed as dist
from moelm.dist.runtime import init_parallel
# registered before init_parallel's handler, so it runs after it (atexit is last in, first out)
atexit.register(lambda: open(sys.argv[1] + str(int(dist.is_initialized())), "w"))
init_parallel("cpu")
"""


def test_the_process_group_is_destroyed_before_the_interpreter_ends(tmp_path):
    """A gloo group left alive into interpreter finalisation can abort a finished rank (SIGABRT)."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE_EXIT)
    completed = run([*TORCHRUN, str(script), str(tmp_path / "initialized-at-exit-")])
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("initialized-at-exit-*")) == ["initialized-at-exit-0"]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_a_rank_that_dies_mid_run_stops_the_others_instead_of_hanging(tmp_path):
    process = _start(tmp_path / "run", 400)
    _wait_for(tmp_path / "run" / "checkpoints" / "step-2", process)
    workers = _children(process.pid)
    assert len(workers) == 2
    os.kill(workers[1], 9)
    try:
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
    assert code != 0


@pytest.mark.slow
def test_sigkill_and_resume_on_two_ranks_is_bitwise_identical(tmp_path):
    straight = tmp_path / "straight"
    pretrain(straight, 6, "parallel.expert_degree=2", ranks=2)
    killed = tmp_path / "killed"
    process = _start(killed, 6, "parallel.expert_degree=2")
    _wait_for(killed / "checkpoints" / "step-2", process)
    os.killpg(process.pid, 9)
    process.wait()
    assert not (killed / "model").exists()
    pretrain(killed, 6, "parallel.expert_degree=2", ranks=2, resume=True)
    first, second = weights(straight / "model"), weights(killed / "model")
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_export_writes_a_checkpoint_as_a_model_directory(single, tmp_path):
    from moelm.cli import main

    checkpoint = single / "checkpoints" / "step-2"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    exported, saved = weights(tmp_path / "hf"), weights(checkpoint / "model")
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf")]) == 2  # not empty
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------------------------------------- SFT and GRPO
def _stage(command: str, base, out, overrides: list[str], ranks: int) -> list[dict]:
    args = ["-m", "moelm", command, "--model", str(base), "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    completed = run([*TORCHRUN, *args] if ranks > 1 else [sys.executable, *args])
    assert completed.returncode == 0, completed.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_on_two_ranks_equals_one_process(tmp_path):
    """Two ranks (experts split, everything else FSDP-sharded) read only their rows of the base model and take the
    one-process steps."""
    from moelm.data.builtin import builtin_corpus
    from moelm.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([r.text for r in builtin_corpus(400, seed=3)], vocab_size=700)
    base = tmp_path / "base"
    MoELM(tiny_config(vocab_size=tokenizer.get_vocab_size(), eos_token_id=1, pad_token_id=2)).save_pretrained(base)
    tokenizer.save(str(base / "tokenizer.json"))
    overrides = [
        "sft.sources=[{format: builtin, num_records: 300, domains: [math, logic]}]",
        "sft.val_examples=8",
        "sft.eval_exact_match=false",
        "data.seq_len=64",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.grad_accum=2",
        "train.log_every=1",
        "train.eval_every=100",
        "log.progress=false",
        "log.sample_tokens=0",
    ]
    one = _stage("sft", base, tmp_path / "one", overrides, ranks=1)
    # EP2 x FSDP: each rank reads its own experts' rows and its FSDP shard of every other tensor from the base.
    two = _stage("sft", base, tmp_path / "two", [*overrides, "parallel.expert_degree=2"], ranks=2)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert_same_model(tmp_path / "one" / "model", tmp_path / "two" / "model")


def test_grpo_on_two_ranks_samples_its_share_and_equals_one_process(tmp_path):
    """Each rank samples half of the prompts' groups; rewards travel with their groups, so both ranks train on
    the batch one process draws and reach its losses and weights."""
    from conftest import addition_task

    overrides = [
        *addition_task(tmp_path),
        "grpo.aggregation=dapo",
        "grpo.dynamic_sampling=true",
        "grpo.difficulty_sampling=true",
        "grpo.beta=0.04",  # the frozen reference is sharded as the policy is
        "train.max_steps=3",
        "train.log_every=1",
        "train.eval_every=100",
        "log.sample_tokens=0",
    ]
    one = _stage("grpo", tmp_path / "base", tmp_path / "one", overrides, ranks=1)
    two = _stage("grpo", tmp_path / "base", tmp_path / "two", overrides, ranks=2)
    for key in ("loss", "reward", "frac_reward_zero_std_drawn", "sampling_rounds"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-6), key
    assert_same_model(tmp_path / "one" / "model", tmp_path / "two" / "model")


@pytest.mark.parametrize(
    ("ranks", "parallel"),
    [
        pytest.param(2, ["parallel.fsdp=true"], marks=pytest.mark.slow),
        pytest.param(2, ["parallel.expert_degree=2", "parallel.fsdp=false"], marks=pytest.mark.slow),
        (2, ["parallel.pipeline_degree=2"]),
        (4, ["parallel.pipeline_degree=2", "parallel.expert_degree=2"]),
    ],
    ids=["fsdp2", "ep2", "pp2", "pp2xep2xfsdp"],
)
def test_the_plan_predicts_what_each_rank_holds_and_sends(tmp_path, ranks, parallel):
    """`moelm plan`'s per-rank figures against a real gloo step of the same layout: parameter, gradient and
    moment bytes as allocated, the peak bytes autograd saved for the backward, and the all-to-all bytes sent,
    each within 10%."""
    from conftest import TINY_RUN

    from moelm.cli.planning import layout_from_recipe
    from moelm.dist.plan import make_plan
    from moelm.train.recipe import load_recipe

    overrides = [*PIPELINE, "train.grad_accum=4", *parallel]
    # The second step is measured: torch's pipeline stages keep their first step's shape-learning forward (one
    # micro-batch of activations on stage 0) alive through that step.
    ENV["MOELM_TEST_WARM_STEP"] = "1"
    try:
        result = one_step(tmp_path, "step", *overrides, ranks=ranks)
    finally:
        del ENV["MOELM_TEST_WARM_STEP"]
    parts = [torch.load(path, weights_only=True) for path in sorted(tmp_path.glob("step.pt.stage*"))] or [result]
    recipe = load_recipe(None, [*TINY_RUN, *STEP, *overrides])
    model_config = recipe.model.replace(vocab_size=_vocab(tmp_path / "step"))
    plan = make_plan(model_config, layout_from_recipe(recipe, ranks, None, 8))
    checks = []
    for part, rank in zip(parts, plan.ranks, strict=True):
        measured = part["measured"]
        predicted = {
            "parameters": rank.state.parameters,
            "gradients": rank.state.gradients,
            "optimizer": rank.state.optimizer,
            "activations": rank.activations,
            "a2a_bytes": rank.a2a_bytes,
        }
        for key, value in predicted.items():
            checks.append((value, measured[key], rank.pp_rank, key))
        # The README's plan-against-measured table is this line under `pytest -s -m "" -k plan_predicts`.
        print(json.dumps({"layout": parallel, "pp_rank": rank.pp_rank, "plan": predicted, "measured": measured}))
    for value, measured_value, *where in checks:
        assert value == pytest.approx(measured_value, rel=0.10, abs=1.0), (*where, value, measured_value)


def _vocab(out: Path) -> int:
    from moelm.data.tokenizer import load_tokenizer_file

    return load_tokenizer_file(out / "tokenizer.json").get_vocab_size()
