"""GRPO objectives as TRL 1.16 computes them (references §13), against independent transcriptions: each
micro-batch's loss, TRL's advantage rules, and the gradient of a whole step accumulated over micro-batches of
unequal length, in one process and on 2 gloo ranks."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import addition_task
from grpo_dist_worker import LENGTHS, MICRO_BATCHES, fixed_micro_batches, recipe_overrides, step_gradients

from moelm import ConfigError
from moelm.train.grpo import GRPOTrainer
from moelm.train.grpo_loss import group_advantages, grpo_loss
from moelm.train.recipe import load_recipe

AGGREGATIONS = ["grpo", "bnpo", "dr_grpo", "dapo"]


def transcribed_loss(logp, old, ref, adv, mask, *, eps_low, eps_high, beta, aggregation, level, delta, bias_kl,
                     max_len, items, processes):  # fmt: skip
    """TRL's _compute_loss for one micro-batch, written out over Python floats."""
    rows, ratios = len(logp), []
    for b in range(rows):
        real = [t for t in range(len(logp[b])) if mask[b][t]]
        if level == "sequence":
            mean_log_ratio = sum(logp[b][t] - old[b][t] for t in real) / max(len(real), 1)
            ratios.append({t: math.exp(mean_log_ratio) for t in real})
        else:
            ratios.append({t: math.exp(logp[b][t] - old[b][t]) for t in real})
    per_row = []
    for b in range(rows):
        values = []
        for t, r in ratios[b].items():
            clipped = min(max(r, 1 - eps_low), 1 + eps_high)
            unclipped = r if delta is None else min(r, delta)
            value = -min(unclipped * adv[b], clipped * adv[b])
            if beta:
                d = ref[b][t] - logp[b][t]
                kl = math.exp(d) - d - 1
                value += beta * (kl * r if bias_kl else kl)
            values.append(value)
        per_row.append(values)
    total = sum(sum(v) for v in per_row)
    tokens = sum(len(v) for v in per_row)
    if aggregation == "grpo":
        return sum(sum(v) / max(len(v), 1) for v in per_row) / rows
    if aggregation == "bnpo":
        return total / max(tokens, 1)
    if aggregation == "dr_grpo":
        return total / (rows * max_len)
    return total / (items / processes)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("delta", [None, 1.1])
@pytest.mark.parametrize(("beta", "bias_kl"), [(0.0, True), (0.04, True), (0.04, False)])
def test_micro_batch_loss_equals_trl_transcription(aggregation, level, delta, beta, bias_kl):
    torch.manual_seed(0)
    logp = torch.randn(4, 7, dtype=torch.float64) * 0.5 - 2
    old = logp + torch.randn(4, 7, dtype=torch.float64) * 0.5  # ratios far outside the clip range both ways
    ref = logp + torch.randn(4, 7, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.5, -0.7, 0.0, -2.0], dtype=torch.float64)
    mask = torch.ones(4, 7)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    options = dict(epsilon_low=0.2, epsilon_high=0.28, beta=beta, aggregation=aggregation)
    extra = dict(importance_sampling_level=level, delta=delta, bias_correction_kl=bias_kl)
    got = grpo_loss(
        logp, old, ref, adv, mask, max_completion_length=9, num_items_in_batch=57.0, num_processes=2,
        **options, **extra,
    )  # fmt: skip
    expected = transcribed_loss(
        logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), eps_low=0.2, eps_high=0.28,
        beta=beta, aggregation=aggregation, level=level, delta=delta, bias_kl=bias_kl, max_len=9, items=57.0,
        processes=2,
    )  # fmt: skip
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_dr_grpo_and_dapo_refuse_to_guess_their_normaliser():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="dr_grpo needs max_completion_length"):
        grpo_loss(logp, logp, None, torch.ones(2), torch.ones(2, 3), aggregation="dr_grpo")
    with pytest.raises(ValueError, match="dapo needs num_items_in_batch"):
        grpo_loss(logp, logp, None, torch.ones(2), torch.ones(2, 3), aggregation="dapo")


def test_unjudged_completions_and_groups_of_one_get_zero_advantage():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 1.0, float("nan"), float("nan"), float("nan"), 2.0])
    advantages = group_advantages(rewards, 4)
    # Group 1: NaN left out of mean (2/3) and Bessel std over the three judged rewards.
    judged = torch.tensor([1.0, 0.0, 1.0])
    expected = (judged - judged.mean()) / (judged.std() + 1e-4)
    torch.testing.assert_close(advantages[[0, 2, 3]], expected)
    assert advantages[1] == 0
    # Group 2: one judged reward has no spread to normalise by: every advantage is 0, none is NaN.
    assert torch.equal(advantages[4:], torch.zeros(4))
    batch = group_advantages(rewards, 4, "batch")
    finite = rewards[torch.isfinite(rewards)]
    assert batch[0].item() == pytest.approx((1.0 - 2 / 3) / (finite.std().item() + 1e-4), rel=1e-5)
    assert torch.equal(group_advantages(torch.tensor([0.3, 0.9, 0.1]), 1), torch.zeros(3))


def test_recipe_offers_trl_s_options_with_checked_values():
    recipe = load_recipe(None, ["grpo.aggregation=bnpo", "grpo.importance_sampling_level=sequence", "grpo.delta=1.5"])
    assert (recipe.grpo.aggregation, recipe.grpo.importance_sampling_level, recipe.grpo.delta) == (
        "bnpo",
        "sequence",
        1.5,
    )
    assert recipe.grpo.use_bias_correction_kl is True  # TRL's default
    with pytest.raises(ConfigError, match=r"invalid grpo.delta=0.9: must be null \(off\) or a number > 1"):
        load_recipe(None, ["grpo.delta=0.9"])
    with pytest.raises(ConfigError, match="invalid grpo.importance_sampling_level='word'"):
        load_recipe(None, ["grpo.importance_sampling_level=word"])


# ---------------------------------------------------------------------------------------------- a whole step
@pytest.fixture(scope="module")
def task(tmp_path_factory):
    directory = tmp_path_factory.mktemp("task")
    return directory, addition_task(directory)


def expected_step_gradient(task, tmp_path, aggregation: str, ranks: int = 1) -> dict[str, torch.Tensor]:
    """The gradient of the step's objective over the whole generation batch, written from TRL's definitions:
    grpo / bnpo / dr_grpo average their per-micro-batch (and per-rank) values, dapo divides the token sum of the
    whole batch by its token count. Ratios are 1 (one update per rollout), so the loss is -A * exp(lp - sg(lp))."""
    directory, overrides = task
    trainer = GRPOTrainer(
        load_recipe(None, recipe_overrides(overrides, aggregation)),
        tmp_path / "reference",
        echo=lambda _: None,
        base_model=directory / "base",
    )
    trainer.setup()
    model = trainer.model.train()
    batches = fixed_micro_batches(model.config.vocab_size)
    total_tokens = sum(sum(lengths) for lengths in LENGTHS)
    max_len = trainer.recipe.grpo.max_completion_tokens
    objective = torch.zeros((), dtype=torch.float64)
    for inputs, _ in batches:
        logprobs = trainer.completion_logprobs(model, inputs)[0].double()
        per_token = -inputs["advantages"].double().unsqueeze(1) * torch.exp(logprobs - logprobs.detach())
        rows = inputs["input_ids"].shape[0]
        for shard in range(ranks):
            part = range(shard * rows // ranks, (shard + 1) * rows // ranks)
            sums = [per_token[r, : inputs["completion_mask"][r].sum()].sum() for r in part]
            counts = [int(inputs["completion_mask"][r].sum()) for r in part]
            if aggregation == "grpo":
                value = sum(s / c for s, c in zip(sums, counts, strict=True)) / len(part)
            elif aggregation == "bnpo":
                value = sum(sums) / sum(counts)
            elif aggregation == "dr_grpo":
                value = sum(sums) / (len(part) * max_len)
            else:  # dapo: one mean over every completion token of the step, whatever the micro-batch or rank
                objective = objective + sum(sums) / total_tokens
                continue
            objective = objective + value / (MICRO_BATCHES * ranks)
    objective.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad.to(got[name].dtype), rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_a_step_accumulated_over_unequal_micro_batches_has_the_whole_batch_gradient(task, tmp_path, aggregation):
    directory, overrides = task
    expected = expected_step_gradient(task, tmp_path, aggregation)
    _, got = step_gradients(directory / "base", tmp_path / "run", recipe_overrides(overrides, aggregation))
    assert_same_gradients(got, expected)
    if aggregation == "dapo":  # the whole-batch mean differs from averaging micro-batch means (bnpo) here
        bnpo = expected_step_gradient(task, tmp_path / "bnpo", "bnpo")
        name = next(iter(bnpo))
        assert not torch.allclose(bnpo[name], got[name], rtol=1e-3)


def test_two_gloo_ranks_reach_the_one_process_gradients(task, tmp_path):
    """dapo, grpo and dr_grpo are global objectives: 2 ranks (each half of every micro-batch, FSDP) give the
    one-process gradient; bnpo averages rank-local token means, as TRL's does."""
    directory, overrides = task
    worker = str(Path(__file__).with_name("grpo_dist_worker.py"))
    result = tmp_path / "grads.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", worker]
    command += [str(directory / "base"), str(tmp_path / "ranks"), str(result), ",".join(AGGREGATIONS), *overrides]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    two_ranks = torch.load(result, weights_only=True)
    for aggregation in AGGREGATIONS:
        ranks = 2 if aggregation == "bnpo" else 1
        expected = expected_step_gradient(task, tmp_path / aggregation, aggregation, ranks=ranks)
        assert_same_gradients(two_ranks[aggregation], expected)


# ---------------------------------------------------------------------------------------------- TRL's own code
class _Accelerator:
    """What TRL's loss reads from accelerate in one process."""

    num_processes = 1
    sync_gradients = False

    def gather(self, x):  # noqa: ANN001, ANN201
        return x.reshape(-1) if x.dim() == 0 else x

    gather_for_metrics = gather

    def reduce(self, x, reduction: str = "sum"):  # noqa: ANN001, ANN201
        return x


def trl_loss(logp, old, ref, adv, mask, *, loss_type, level, delta, beta, bias_kl, max_len, items, accumulation):
    """trl 1.16's GRPOTrainer._compute_loss on these tensors: its own code, with the model forward replaced by
    the given log-probabilities (everything else it reads is set as GRPOConfig would set it)."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer as TRLTrainer

    fake = SimpleNamespace(
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=max_len,
        current_gradient_accumulation_steps=accumulation,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False,
        accelerator=_Accelerator(),
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta, steps_per_generation=accumulation),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    rows, width = logp.shape
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows, width, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": torch.tensor(items),
    }
    if beta:
        inputs["ref_per_token_logps"] = ref
    return TRLTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize(("delta", "beta", "bias_kl"), [(None, 0.0, True), (1.1, 0.04, True), (None, 0.04, False)])
def test_micro_batch_loss_and_gradient_equal_trl_s_own_code(aggregation, level, delta, beta, bias_kl):
    """Same tensors through trl 1.16's _compute_loss and moelm's grpo_loss: the loss of one micro-batch of an
    accumulation window of 3 and its gradient. TRL divides by the window itself; moelm's trainer divides every
    micro-batch loss by it and undoes that for dapo, so moelm's value / 3 (dapo: as is) is TRL's."""
    pytest.importorskip("trl", minversion="1.16")
    torch.manual_seed(1)
    logp = (torch.randn(4, 7, dtype=torch.float64) * 0.5 - 2).requires_grad_()
    old = logp.detach() + torch.randn(4, 7, dtype=torch.float64) * 0.5
    ref = logp.detach() + torch.randn(4, 7, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.5, -0.7, 0.3, -2.0], dtype=torch.float64)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    options = dict(level=level, delta=delta, beta=beta, bias_kl=bias_kl, max_len=9, items=57.0, accumulation=3)
    theirs = trl_loss(logp, old, ref, adv, mask, loss_type=aggregation, **options)
    (their_grad,) = torch.autograd.grad(theirs, logp)
    ours = grpo_loss(
        logp, old, ref if beta else None, adv, mask, epsilon_low=0.2, epsilon_high=0.28, beta=beta,
        aggregation=aggregation, max_completion_length=9, importance_sampling_level=level, delta=delta,
        bias_correction_kl=bias_kl, num_items_in_batch=57.0, num_processes=1,
    )  # fmt: skip
    ours = ours if aggregation == "dapo" else ours / 3
    (our_grad,) = torch.autograd.grad(ours, logp)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12, abs=1e-15)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-12, atol=1e-15)
