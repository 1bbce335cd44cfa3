"""Balancing losses, capacity, the aux-loss-free bias update, checkpointing and telemetry (references §2)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import expert_forward, tiny_config, tiny_setup

from moelm import MoELM
from moelm.model.balance import (
    capacity,
    capacity_drops,
    cv_squared,
    router_z_loss,
    sequence_balance_loss,
    smooth_load,
    switch_loss,
)
from moelm.model.moe import MoE
from moelm.train.bias_balancer import BiasBalancer
from moelm.train.telemetry import CollapseMonitor, routing_metrics


def test_switch_loss_hand_value_and_gradient_pushes_away_from_overloaded_expert():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    ids = torch.tensor([[0], [0]])  # both tokens on expert 0: f = [1, 0]; P = [0.625, 0.375]
    loss = switch_loss(logits, ids)
    assert loss.item() == pytest.approx(2 * 0.625)
    loss.backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1] < 0).all()


def test_switch_loss_is_one_at_perfect_balance_and_ignores_padding():
    logits = torch.zeros(4, 4)
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])
    assert switch_loss(logits, ids).item() == pytest.approx(1.0)
    padded_ids = torch.cat((ids, torch.tensor([[0, 1]] * 3)))
    mask = torch.tensor([True] * 4 + [False] * 3)
    assert switch_loss(torch.zeros(7, 4), padded_ids, mask).item() == pytest.approx(1.0)


def test_sequence_wise_loss_hand_value_gradient_and_padding():
    scores = torch.tensor([[[0.5, 0.5], [0.75, 0.25]]], requires_grad=True)
    ids = torch.tensor([[[0], [0]]])  # f = E/(kT) * hits = [2, 0]; P = [0.625, 0.375]
    loss = sequence_balance_loss(scores, ids)
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    assert scores.grad[0, :, 0].sum() > 0  # descending lowers the overloaded expert's score
    padded = torch.tensor([[[0.5, 0.5], [0.75, 0.25], [0.1, 0.9]]])
    padded_ids = torch.tensor([[[0], [0], [1]]])
    mask = torch.tensor([[True, True, False]])
    assert sequence_balance_loss(padded, padded_ids, mask).item() == pytest.approx(1.25)


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_cv_squared_is_population_variance_over_mean_squared():
    assert cv_squared(torch.tensor([1.0, 1.0])).item() == pytest.approx(0.0)
    assert cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25)


def test_smooth_load_uses_kth_largest_of_the_other_experts():
    clean = torch.tensor([[1.0, 0.0, 0.0]])
    noisy = torch.tensor([[1.5, 0.2, -0.1]])
    std = torch.ones(1, 3)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    expected = [phi(1.0 - 0.2), phi(0.0 - 1.5), phi(0.0 - 1.5)]
    torch.testing.assert_close(smooth_load(clean, noisy, std, top_k=1), torch.tensor(expected))


def test_capacity_drops_second_choices_before_first_choices():
    assert capacity(num_tokens=3, num_experts=2, top_k=2, capacity_factor=0.75) == 2
    ids = torch.tensor([[0, 1], [0, 1], [1, 0]])
    # Expert 0 queue: t0 (1st), t1 (1st), t2 (2nd) -> t2's 2nd choice dropped.
    # Expert 1 queue: t2 (1st), t0 (2nd), t1 (2nd) -> t1's 2nd choice dropped.
    expected = torch.tensor([[False, False], [False, True], [False, True]])
    assert torch.equal(capacity_drops(ids, num_experts=2, slots=2), expected)


def test_dropped_assignments_contribute_nothing_and_tokens_keep_the_residual():
    config, options = tiny_setup(capacity_factor=0.5, n_shared_experts=0, n_group=1, topk_group=1)
    moe = MoE(config, options).train()
    x = torch.randn(1, 24, config.hidden_size)
    y, routing = moe(x)
    assert routing.dropped_TK.any()
    kept_weights = routing.weights_TK.masked_fill(routing.dropped_TK, 0.0)
    expected = torch.zeros(24, config.hidden_size)
    for t in range(24):
        for slot in range(config.num_experts_per_tok):
            expert = routing.expert_ids_TK[t, slot].item()
            expected[t] += kept_weights[t, slot] * expert_forward(moe.experts, expert, x[0, t : t + 1])[0]
    torch.testing.assert_close(y[0], expected, atol=1e-6, rtol=1e-5)
    model = MoELM(*tiny_setup(capacity_factor=0.5, eval_capacity_factor=None)).eval()
    assert model(torch.randint(0, 97, (1, 8))).routing[1].dropped_TK is None  # eval is dropless here


def test_model_returns_each_loss_with_coefficients_and_adds_them_to_the_loss():
    config, options = tiny_setup(aux_loss_alpha=0.01, seq_aux_loss_alpha=0.001, router_z_loss_coef=0.001)
    model = MoELM(config, options)
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"aux_loss", "seq_aux_loss", "z_loss"}
    layer = out.routing[1]
    assert layer.losses["aux_loss"].item() == pytest.approx(
        0.01 * switch_loss(layer.logits_TE, layer.expert_ids_TK).item()
    )
    torch.testing.assert_close(out.loss, out.lm_loss + out.balance_loss)


def test_noisy_gating_adds_noise_only_in_training_and_returns_importance_and_load_losses():
    config, options = tiny_setup(
        noisy_gating=True, importance_loss_coef=0.1, load_loss_coef=0.1, n_group=1, topk_group=1
    )
    moe = MoE(config, options)
    x = torch.randn(1, 16, config.hidden_size)
    moe.eval()
    first, second = moe(x)[1], moe(x)[1]
    assert torch.equal(first.logits_TE, second.logits_TE)
    moe.train()
    noisy = moe(x)[1]
    assert not torch.equal(noisy.logits_TE, first.logits_TE)
    assert set(noisy.losses) == {"importance_loss", "load_loss"}
    sum(noisy.losses.values()).backward()
    assert moe.gate.noise_weight.grad.abs().sum() > 0


def test_bias_update_sign_rule_accumulates_micro_batches_and_runs_once_per_step():
    model = MoELM(tiny_config(num_hidden_layers=2))
    balancer = BiasBalancer(model, rate=0.01)
    fake = type("R", (), {})
    first, second = fake(), fake()
    first.tokens_per_expert_E = torch.tensor([3.0, 1, 0, 4, 0, 0, 0, 0])
    second.tokens_per_expert_E = torch.tensor([0.0, 0, 0, 0, 8, 0, 0, 0])
    balancer.observe({1: first})
    balancer.observe({1: second})  # accumulated load [3, 1, 0, 4, 8, 0, 0, 0], mean 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    balancer.register(optimizer)
    optimizer.step()
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    torch.testing.assert_close(bias, torch.tensor([-1.0, 1, 1, -1, -1, 1, 1, 1]) * 0.01)
    optimizer.step()  # nothing observed since the last step: no update
    torch.testing.assert_close(bias, torch.tensor([-1.0, 1, 1, -1, -1, 1, 1, 1]) * 0.01)


def test_centered_bias_update_has_zero_mean():
    model = MoELM(tiny_config(num_hidden_layers=2))
    balancer = BiasBalancer(model, rate=0.01, centered=True)
    routing = type("R", (), {"tokens_per_expert_E": torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 1])})()
    balancer.observe({1: routing})
    balancer.step()
    assert model.layers[1].mlp.gate.e_score_correction_bias.sum().abs() < 1e-7


def test_bias_persists_through_save_and_load(tmp_path):
    model = MoELM(tiny_config())
    model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.arange(8.0) / 10)
    model.save_pretrained(tmp_path)
    loaded = MoELM.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.layers[1].mlp.gate.e_score_correction_bias, torch.arange(8.0) / 10)


@pytest.mark.parametrize("mode", ["full", "moe"])
def test_activation_checkpointing_gives_identical_gradients_routing_and_counts(mode):
    base, options = tiny_setup(num_hidden_layers=3, noisy_gating=True, load_loss_coef=0.01, n_group=1, topk_group=1)
    ids = torch.randint(0, 97, (2, 16))
    results = []
    for setting in ("none", mode):
        torch.manual_seed(1)
        model = MoELM(base, options.replace(activation_checkpointing=setting)).train()
        torch.manual_seed(2)  # same noise draws in both runs
        out = model(ids, labels=ids)
        out.loss.backward()
        balancer = BiasBalancer(model, rate=1.0)
        balancer.observe(out.routing)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, {k: v.clone() for k, v in balancer.counts.items()}))
    (plain, plain_grads, plain_counts), (ckpt, ckpt_grads, ckpt_counts) = results
    for layer in plain.routing:
        assert torch.equal(plain.routing[layer].expert_ids_TK, ckpt.routing[layer].expert_ids_TK)
        assert torch.equal(plain_counts[layer], ckpt_counts[layer])
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(plain_grads[name], ckpt_grads[name], atol=1e-6, rtol=1e-5)


def test_routing_metrics_are_flat_named_scalars():
    model = MoELM(*tiny_setup(num_hidden_layers=3, aux_loss_alpha=0.01, router_z_loss_coef=0.001))
    out = model(torch.randint(0, 97, (2, 8)))
    metrics = routing_metrics(out.routing, model)
    for key in ("moe/layer1/load_max_over_mean", "moe/layer2/idle_frac", "moe/load_max_over_mean"):
        assert key in metrics
    for key in ("moe/dropped_frac", "moe/aux_loss", "moe/z_loss", "moe/routing_entropy", "moe/bias_abs_mean"):
        assert key in metrics
    counts = out.routing[1].tokens_per_expert_E
    assert metrics["moe/layer1/load_max_over_mean"] == pytest.approx((counts.max() / counts.mean()).item())
    assert sum(metrics[f"moe/layer1/tokens_expert{e}"] for e in range(8)) == 2 * 8 * 2


def test_collapse_monitor_warns_after_patience_steps():
    monitor = CollapseMonitor(threshold=3.0, patience=3)
    skewed = type("R", (), {"tokens_per_expert_E": torch.tensor([16.0, 0, 0, 0, 0, 0, 0, 0])})()
    balanced = type("R", (), {"tokens_per_expert_E": torch.full((8,), 2.0)})()
    assert monitor.update({1: skewed}) == []
    assert monitor.update({1: balanced}) == []  # streak resets
    monitor.update({1: skewed})
    monitor.update({1: skewed})
    with pytest.warns(RuntimeWarning, match="layer 1"):
        assert monitor.update({1: skewed}) == [1]


def _final_load_ratio(steps: int = 200, **balancing) -> float:
    """Train a tiny model on Zipf-skewed tokens; mean max/mean expert load of the last 20 steps."""
    torch.manual_seed(0)
    config, options = tiny_setup(
        vocab_size=64, n_group=1, topk_group=1, num_attention_heads=2, initializer_range=0.1, **balancing
    )
    model = MoELM(config, options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    balancer = None
    if options.bias_update_rate:
        balancer = BiasBalancer(model, options.bias_update_rate)
        balancer.register(optimizer)
    generator = torch.Generator().manual_seed(1)
    zipf = 1.0 / torch.arange(1, 65, dtype=torch.float32)
    ratios = []
    for _ in range(steps):
        ids = torch.multinomial(zipf, 8 * 16, replacement=True, generator=generator).view(8, 16)
        out = model(ids, labels=ids)
        optimizer.zero_grad()
        out.loss.backward()
        if balancer is not None:
            balancer.observe(out.routing)
        optimizer.step()
        counts = out.routing[1].tokens_per_expert_E
        ratios.append((counts.max() / counts.mean()).item())
    return sum(ratios[-20:]) / 20


def test_every_balancing_method_ends_better_balanced_than_none():
    unbalanced = _final_load_ratio()
    methods = {
        "switch": dict(aux_loss_alpha=0.3),
        "sequence-wise": dict(seq_aux_loss_alpha=0.3),
        "noisy top-k": dict(noisy_gating=True, importance_loss_coef=0.3, load_loss_coef=0.3, scoring_func="softmax"),
        "aux-loss-free bias": dict(bias_update_rate=0.01),
    }
    for name, options in methods.items():
        ratio = _final_load_ratio(**options)
        assert ratio < 0.8 * unbalanced, f"{name}: max/mean load {ratio:.2f} vs {unbalanced:.2f} without balancing"
