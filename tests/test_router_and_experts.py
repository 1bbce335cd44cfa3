"""Router and expert dispatch against a naive per-token float64 reference, for every router option."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from moelm.config import MoEOptions
from moelm.model.kernels.grouped_gemm import expert_backend
from moelm.model.moe import MoE
from moelm.model.router import Router


def reference_route(x, weight, bias, config):
    """Per-token loop in float64: scores, biased choice, group masking, top-k, unbiased normalised weights."""
    E, G = config.n_routed_experts, config.n_group
    per_group = E // G
    ids, weights = [], []
    bias = bias.detach()
    for token in x.double():
        logits = [float(token @ weight[e].detach().double()) for e in range(E)]
        if config.scoring_func == "sigmoid":
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        else:
            top = max(logits)
            exp = [math.exp(v - top) for v in logits]
            scores = [v / sum(exp) for v in exp]
        choice = [scores[e] + float(bias[e]) for e in range(E)]
        if G > 1:
            group_scores = []
            for g in range(G):
                members = sorted(choice[g * per_group : (g + 1) * per_group], reverse=True)
                group_scores.append(members[0] + members[1] if config.scoring_func == "sigmoid" else members[0])
            kept = sorted(range(G), key=lambda g: -group_scores[g])[: config.topk_group]
            choice = [choice[e] if e // per_group in kept else -math.inf for e in range(E)]
        chosen = sorted(range(E), key=lambda e: -choice[e])[: config.num_experts_per_tok]
        w = [scores[e] for e in chosen]
        if config.norm_topk_prob:
            w = [v / (sum(w) + 1e-20) for v in w]
        ids.append(chosen)
        weights.append([v * config.routed_scaling_factor for v in w])
    return ids, weights


ROUTER_OPTIONS = [
    dict(scoring_func="sigmoid", n_group=1, topk_group=1),
    dict(scoring_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5),
    dict(scoring_func="sigmoid", n_group=2, topk_group=1, norm_topk_prob=False),
    dict(scoring_func="softmax", n_group=1, topk_group=1, norm_topk_prob=False),
    dict(scoring_func="softmax", n_group=4, topk_group=2),
]


def _router_with_bias(config):
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.normal_(0, 0.3)
    return router


@pytest.mark.parametrize("options", ROUTER_OPTIONS)
def test_router_matches_float64_reference(options):
    config = tiny_config(**options)
    router = _router_with_bias(config)
    x = torch.randn(40, config.hidden_size)
    routing = router(x)
    ref_ids, ref_weights = reference_route(x, router.weight, router.e_score_correction_bias, config)
    order = routing.expert_ids_TK.argsort(dim=-1)
    got_ids = routing.expert_ids_TK.gather(1, order)
    got_weights = routing.weights_TK.gather(1, order)
    for t in range(40):
        pairs = sorted(zip(ref_ids[t], ref_weights[t], strict=True))
        assert got_ids[t].tolist() == [e for e, _ in pairs]
        expected = torch.tensor([w for _, w in pairs], dtype=torch.float64)
        torch.testing.assert_close(got_weights[t].double(), expected, atol=1e-6, rtol=0)
    assert routing.tokens_per_expert_E.tolist() == torch.bincount(got_ids.flatten(), minlength=8).tolist()


def test_bias_changes_selection_but_not_weights():
    config = tiny_config(n_group=1, topk_group=1, norm_topk_prob=False)
    router = _router_with_bias(config)
    router.e_score_correction_bias.zero_()
    x = torch.randn(16, config.hidden_size)
    router.e_score_correction_bias[3] = 10.0  # forces expert 3 into every token's top-k
    routing = router(x)
    assert (routing.expert_ids_TK == 3).any(dim=1).all()
    scores = torch.sigmoid(x @ router.weight.T)
    torch.testing.assert_close(routing.weights_TK, scores.gather(1, routing.expert_ids_TK))


def test_groups_outside_the_best_are_masked_even_with_negative_bias():
    config = tiny_config(n_group=2, topk_group=1, num_experts_per_tok=3)
    router = Router(config)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:4, 0] = 5.0  # group 0 (experts 0-3) scores ~0.99, group 1 scores 0.5
        router.e_score_correction_bias[:2] = -0.2  # group 0 still wins: 0.79 + 0.79 > 0.5 + 0.5
        router.e_score_correction_bias[2:4] = -1.5  # ...but its 3rd-best biased choice is negative
    routing = router(torch.ones(3, config.hidden_size))
    # With 0 instead of -inf for masked experts, group 1's experts (0) would beat expert 2/3 (-0.51).
    assert (routing.expert_ids_TK < 4).all(), "experts outside the kept group must never be chosen"


def test_router_stays_float32_when_model_is_cast():
    moe = MoE(tiny_config()).to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.float32
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16


def reference_moe(moe, x):
    """Token by token in float64: sum_k w_k * Expert(x) + Shared(x)."""
    routing = moe.gate(x)
    up, down = moe.experts.gate_up_proj.double(), moe.experts.down_proj.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for e, w in zip(routing.expert_ids_TK[t].tolist(), routing.weights_TK[t].double(), strict=True):
            gate, upv = (up[e] @ xt).chunk(2)
            out[t] += w * (down[e] @ (F.silu(gate) * upv))
        shared = moe.shared_experts
        gate, upv = (shared.gate_up_proj.weight.double() @ xt).chunk(2)
        out[t] += shared.down_proj.weight.double() @ (F.silu(gate) * upv)
    return out


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("options", ROUTER_OPTIONS)
def test_moe_dispatch_matches_per_token_reference(backend, options):
    config = tiny_config(n_shared_experts=2, **options)
    moe = MoE(config, MoEOptions(expert_backend=backend))
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.3)
    moe.gate.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(3, 11, config.hidden_size)
    with torch.no_grad():
        y, _ = moe(x)
        expected = reference_moe(moe, x.reshape(-1, config.hidden_size))
    torch.testing.assert_close(y.reshape(-1, config.hidden_size).double(), expected, atol=1e-5, rtol=1e-5)


def test_experts_nobody_chose_are_skipped_and_gradients_reach_chosen_ones():
    config = tiny_config(n_group=1, topk_group=1, num_experts_per_tok=1, norm_topk_prob=False)
    moe = MoE(config)
    with torch.no_grad():
        moe.gate.e_score_correction_bias[5] = 10.0  # everyone picks expert 5
    x = torch.randn(7, config.hidden_size)
    y, routing = moe(x)
    y.sum().backward()
    assert routing.tokens_per_expert_E.tolist() == [0, 0, 0, 0, 0, 7.0, 0, 0]
    grads = moe.experts.gate_up_proj.grad.abs().sum(dim=(1, 2))
    assert grads[5] > 0 and grads[torch.arange(8) != 5].eq(0).all()
    assert moe.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_training_dispatch_gradients_match_per_token_reference(backend):
    """The training path's sort and unsort are custom gathers with hand-written backwards; their gradients
    must equal autograd through the per-token float64 definition."""
    config = tiny_config(num_experts_per_tok=3)
    moe = MoE(config, MoEOptions(expert_backend=backend))
    for param in moe.experts.parameters():
        torch.nn.init.normal_(param, std=0.3)
    x = torch.randn(13, config.hidden_size, requires_grad=True)
    target = torch.randn(13, config.hidden_size)
    y, _ = moe(x)
    (y * target).sum().backward()
    got = (x.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad)
    for tensor in (x, *moe.parameters()):
        tensor.grad = None
    moe.double()
    x64 = x.detach().double().requires_grad_()
    with torch.no_grad():
        routing = moe.gate(x64.float().double())
    (reference_moe(moe, x64) * target.double()).sum().backward()
    assert routing.expert_ids_TK.shape == (13, 3)
    expected = (x64.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad)
    for ours, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(ours.double(), reference, atol=1e-5, rtol=1e-4)


def test_auto_backend_on_cpu_is_grouped_for_float32_training_and_a_loop_otherwise(monkeypatch):
    import moelm.model.kernels.grouped_gemm as kernels

    cpu = torch.device("cpu")
    assert expert_backend("auto", cpu, torch.float32, True) == "grouped_mm"
    assert expert_backend("auto", cpu, torch.float32, False) == "loop"
    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: False)
    assert expert_backend("auto", cpu, torch.bfloat16, True) == "loop"
    assert expert_backend("loop", cpu, torch.float32, True) == "loop"
    assert expert_backend("auto", torch.device("cuda"), torch.bfloat16, False) == "grouped_mm"


def test_the_dispatcher_is_a_seam_the_experts_do_not_look_behind():
    """Expert parallelism swaps the dispatcher: the experts must compute only what it hands them."""
    from moelm.model.dispatch import LocalDispatcher

    class Recording(LocalDispatcher):
        def __init__(self, num_experts: int) -> None:
            super().__init__(num_experts)
            self.slabs: list[list[int]] = []

        def dispatch(self, x_TH, routing):
            rows, counts, plan = super().dispatch(x_TH, routing)
            self.slabs.append(counts.tolist())
            return rows, counts, plan

    moe = MoE(tiny_config())
    x = torch.randn(2, 5, 32)
    expected, _ = moe(x)
    moe.experts.dispatcher = recording = Recording(moe.experts.num_experts)
    got, routing = moe(x)
    torch.testing.assert_close(got, expected)
    assert recording.slabs == [routing.tokens_per_expert_E.long().tolist()]


def test_grouped_and_loop_backends_give_the_same_gradients():
    grads = []
    for backend in ("loop", "grouped_mm"):
        torch.manual_seed(3)
        moe = MoE(tiny_config(), MoEOptions(expert_backend=backend))
        x = torch.randn(2, 9, 32, requires_grad=True)
        moe(x)[0].square().sum().backward()
        grads.append((x.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad, moe.gate.weight.grad))
    for loop_grad, grouped_grad in zip(*grads, strict=True):
        torch.testing.assert_close(loop_grad, grouped_grad, atol=1e-6, rtol=1e-5)


def test_cpu_grouped_gemm_op_matches_per_group_matmuls_and_passes_opcheck():
    from moelm.model.kernels.grouped_gemm import _cpu_grouped_mm as grouped_mm

    offs = torch.tensor([3, 3, 10], dtype=torch.int32)  # the middle group is empty
    a = torch.randn(10, 16, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(3, 8, 16).requires_grad_()
    out = grouped_mm(a, w.transpose(1, 2), offs)
    (out * out).sum().backward()
    a_ref, w_ref = a.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    bounds = [(0, 3), (3, 3), (3, 10)]
    ref = torch.cat([a_ref[lo:hi] @ w_ref[e].t() for e, (lo, hi) in enumerate(bounds)])
    (ref * ref).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(a.grad, a_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)
    assert not w.grad[1].any()  # an expert with no rows gets a zero gradient
    args = (torch.randn(10, 16, requires_grad=True), torch.randn(3, 16, 8, requires_grad=True), offs)
    torch.library.opcheck(torch.ops.moelm.grouped_mm, args)  # fake kernel, autograd registration, schema
