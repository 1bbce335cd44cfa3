"""What makes GRPO's gradient non-zero (dynamic sampling, prompt difficulty, a curriculum) and MoE under RL
(routing drift, routing replay)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import addition_task, assert_resume_is_exact, tiny_config

from moelm import MoELM
from moelm.model.replay import drift, replay_routing, routed_experts
from moelm.train.grpo import GRPOTrainer
from moelm.train.prompts import Prompt, PromptSampler
from moelm.train.recipe import load_recipe
from moelm.train.rollouts import Group, merge_groups


# ---------------------------------------------------------------------------------------------- prompt sampler
def _prompts(levels: list[int]) -> list[Prompt]:
    return [Prompt(f"q{i}", str(i), "math", None, level) for i, level in enumerate(levels)]


def test_difficulty_sampling_prefers_prompts_the_model_sometimes_passes():
    sampler = PromptSampler(_prompts([1] * 3), weighted=True)
    sampler.observe([0, 1, 2], [[True] * 8, [True, False] * 4, [False] * 8])  # mastered, inside, hopeless
    draws = np.bincount(sampler.draw(np.random.default_rng(0), 3000), minlength=3)
    assert draws[1] > 0.85 * 3000  # weight 1 against the floor 0.05 twice
    assert draws[0] > 0 and draws[2] > 0  # never abandoned
    assert sampler.metrics()["prompts/inside_share"] == pytest.approx(1 / 3)


def test_the_curriculum_opens_the_next_level_when_the_open_ones_are_passed():
    sampler = PromptSampler(_prompts([1, 1, 2, 3]), curriculum=True, unlock_at=0.6)
    assert set(sampler.draw(np.random.default_rng(0), 50)) == {0, 1}
    sampler.observe([0, 1], [[True, False], [False, False]])  # 25%: stays at level 1
    assert sampler.level == 1
    sampler.observe([0, 1], [[True] * 6, [True] * 6])  # 14 of 16
    assert sampler.level == 2 and set(sampler.draw(np.random.default_rng(1), 80)) == {0, 1, 2}
    restored = PromptSampler(_prompts([1, 1, 2, 3]), curriculum=True)
    restored.load_state(json.loads(json.dumps(sampler.state())))
    assert restored.level == 2 and np.array_equal(restored.passes, sampler.passes)
    assert restored.draw(np.random.default_rng(5), 20) == sampler.draw(np.random.default_rng(5), 20)


def test_uniform_drawing_is_unchanged_without_difficulty_or_curriculum():
    sampler = PromptSampler(_prompts([1, 2, 3, 4]))
    assert sampler.draw(np.random.default_rng([0, 3]), 6) == np.random.default_rng([0, 3]).choice(4, 6).tolist()


# ---------------------------------------------------------------------------------------------- merging groups
def test_groups_from_different_rounds_merge_into_one_padded_batch():
    def group(prompt: list[int], completion: list[list[int]]) -> Group:
        width = max(len(c) for c in completion)
        tokens = torch.tensor([c + [9] * (width - len(c)) for c in completion])
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completion])
        rewards = torch.arange(len(completion), dtype=torch.float32)
        return Group([prompt] * len(completion), tokens, mask, torch.zeros(len(completion), dtype=torch.bool),
                     rewards, {"accuracy": [1.0] * len(completion)})  # fmt: skip

    merged = merge_groups([group([5, 6], [[7], [7, 8]]), group([5, 6, 7, 8], [[3, 4, 5], [4]])], pad_id=0)
    assert merged["input_ids"].tolist() == [  # sampled tokens past a completion's end stay, masked out (9)
        [0, 0, 5, 6, 7, 9, 0],
        [0, 0, 5, 6, 7, 8, 0],
        [5, 6, 7, 8, 3, 4, 5],
        [5, 6, 7, 8, 4, 9, 9],
    ]
    assert merged["attention_mask"].tolist() == [
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0],
    ]
    assert merged["completion_mask"].sum(1).tolist() == [1, 2, 3, 1]
    assert merged["rewards"].tolist() == [0.0, 1.0, 0.0, 1.0] and merged["per_function"]["accuracy"] == [1.0] * 4


# ---------------------------------------------------------------------------------------------- trainer level
@pytest.fixture(scope="module")
def task(tmp_path_factory):
    directory = tmp_path_factory.mktemp("task")
    return directory, addition_task(directory)


def _trainer(task, out, *extra: str) -> GRPOTrainer:
    directory, overrides = task
    recipe = load_recipe(None, [*overrides, "log.sample_tokens=0", *extra])
    trainer = GRPOTrainer(recipe, out, echo=lambda _: None, base_model=directory / "base")
    trainer.setup()
    return trainer


def test_dynamic_sampling_fills_the_batch_with_groups_that_carry_a_gradient(task, tmp_path):
    plain = _trainer(task, tmp_path / "plain").batches.train_batch(0)[1]
    dynamic = _trainer(task, tmp_path / "dynamic", "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=8")
    inputs, metrics = dynamic.batches.train_batch(0)
    assert plain["frac_reward_zero_std_drawn"] > 0  # the untrained model: many groups all wrong
    assert plain["frac_reward_zero_std"] == plain["frac_reward_zero_std_drawn"] and plain["sampling_rounds"] == 1
    assert metrics["sampling_rounds"] > 1 and metrics["frac_reward_zero_std_drawn"] > 0
    assert metrics["frac_reward_zero_std"] == 0  # every group kept has rewards that differ
    groups = inputs["advantages"].view(-1, 8)
    assert groups.shape[0] == 8 and (groups.abs().sum(dim=1) > 0).all()


def test_dynamic_sampling_is_bounded_and_tops_up_the_batch(task, tmp_path):
    trainer = _trainer(task, tmp_path / "bounded", "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=1")
    inputs, metrics = trainer.batches.train_batch(0)
    assert metrics["sampling_rounds"] == 1 and inputs["advantages"].shape[0] == 64  # size kept whatever happens


def test_routing_drift_is_logged_and_replay_reuses_the_rollout_s_experts(task, tmp_path):
    def two_iterations(trainer: GRPOTrainer) -> list[dict]:
        records = []
        for cursor in range(2):  # the same rollout twice: drawn by the policy before the first update
            records.append(trainer.train_step([trainer.batches.train_batch(cursor)], trainer.loss))
        return records

    quiet = _trainer(task, tmp_path / "off", "grpo.num_iterations=2")
    assert "rollout_experts" not in quiet.batches.train_batch(0)[0]  # off by default: no extra forward
    drifting = _trainer(task, tmp_path / "drift", "grpo.num_iterations=2", "optim.lr=0.05", "grpo.routing_drift=true")
    first, second = two_iterations(drifting)
    assert first["routing_drift"] == 0 and "routing_drift/layer1" in first  # same policy, same routing
    assert 0 < second["routing_drift"] <= 1  # one update later the same tokens go elsewhere
    replay = _trainer(task, tmp_path / "replay", "grpo.num_iterations=2", "optim.lr=0.05", "grpo.routing_replay=true")
    _, replayed = two_iterations(replay)
    # Under replay the logged drift is what the router would choose now against the replayed rollout choice.
    assert replayed["routing_drift"] == pytest.approx(second["routing_drift"])


def test_replay_routing_forces_the_recorded_experts_and_keeps_router_gradients():
    torch.manual_seed(0)
    model = MoELM(tiny_config(num_hidden_layers=3, initializer_range=0.2)).train()
    ids = torch.randint(0, 97, (2, 6))
    out = model(ids)
    recorded = routed_experts(out.routing, 2, [1, 2])
    forced = (recorded + 1) % 8  # other experts for every token
    with replay_routing(model, forced):
        replayed = model(ids, labels=ids)
    assert torch.equal(routed_experts(replayed.routing, 2, [1, 2]), forced.sort(dim=-1).values.to(torch.int16))
    natural = replayed.routing[1].natural_ids_TK.sort(-1).values.view(2, 6, -1)
    assert torch.equal(natural.to(torch.int16), recorded[:, 0])  # what the first router would have picked
    replayed.loss.backward()
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0  # gate weights recomputed: the router learns
    assert model.layers[1].mlp.replay_BTK is None  # cleared after the block
    shares = drift(recorded, forced, torch.ones(2, 6))
    assert shares.tolist() == [1.0, 1.0] and drift(recorded, recorded, torch.ones(2, 6)).tolist() == [0.0, 0.0]


def test_resume_is_exact_with_dynamic_sampling_difficulty_and_curriculum(task, tmp_path):
    directory, overrides = task
    extra = [
        "grpo.dynamic_sampling=true",
        "grpo.difficulty_sampling=true",
        "grpo.curriculum=true",
        "grpo.max_completion_tokens=2",
        "train.max_steps=4",
        "train.save_every=2",
        "log.sample_tokens=0",
    ]
    recipe = load_recipe(None, [*overrides, *extra])
    assert_resume_is_exact(GRPOTrainer, recipe, tmp_path, directory / "base", last_step=4, saved_step=2)


@pytest.mark.parametrize(
    "setting",
    [
        "grpo.importance_sampling_level=sequence",
        "grpo.delta=1.01",
        "grpo.use_bias_correction_kl=false",
        "grpo.epsilon_high=0.01",
    ],
)
def test_each_objective_setting_changes_the_trainer_s_loss(task, tmp_path, setting):
    """Off-policy (second use of a rollout, after an update) every objective option changes the loss the trainer
    optimises; KL is on so that the bias correction has a term to act on."""
    common = ["grpo.num_iterations=2", "optim.lr=0.05", "grpo.beta=0.04", "grpo.aggregation=bnpo"]
    common += ["grpo.max_completion_tokens=3", "grpo.overlong_cache_tokens=2"]  # multi-token; lengths vary rewards

    def second_loss(name: str, *extra: str) -> float:
        trainer = _trainer(task, tmp_path / name, *common, *extra)
        trainer.train_step([trainer.batches.train_batch(0)], trainer.loss)
        return trainer.train_step([trainer.batches.train_batch(1)], trainer.loss)["policy_loss"]

    changed, base = second_loss("changed", setting), second_loss("base")
    assert abs(changed - base) > 1e-4 * abs(base) > 0


def test_difficulty_and_curriculum_settings_reach_the_prompt_sampler(task, tmp_path):
    trainer = _trainer(task, tmp_path / "levels", "grpo.difficulty_sampling=true", "grpo.curriculum=true",
                       "grpo.curriculum_unlock_at=0.9")  # fmt: skip
    sampler = trainer.batches.sampler
    assert (sampler.weighted, sampler.curriculum, sampler.unlock_at) == (True, True, 0.9)
    plain = _trainer(task, tmp_path / "plain").batches.sampler
    assert not plain.weighted and not plain.curriculum


def test_compile_rollouts_reaches_the_rollout_decode(task, tmp_path):
    """grpo.compile_rollouts gives the policy a compiled step bound to it (built lazily, so nothing compiles
    here); off, rollouts decode eagerly."""
    compiled = _trainer(task, tmp_path / "compiled", "grpo.compile_rollouts=true")
    step = compiled._rollout_compiled()
    assert step is not None and step.model is compiled.model and compiled._rollout_compiled() is step
    assert _trainer(task, tmp_path / "eager")._rollout_compiled() is None


@pytest.mark.slow  # builds the compiled decode step for the rollout's shapes
def test_compiled_rollouts_sample_the_eager_rollouts(task, tmp_path, monkeypatch):
    """The same seeds through the compiled step draw the same completions as eager decoding."""
    monkeypatch.setenv("MOELM_AOT_CACHE", str(tmp_path / "aot"))
    longer = "grpo.max_completion_tokens=5"  # decode steps, not just the prefill's token
    eager = _trainer(task, tmp_path / "eager", longer).batches.train_batch(0)[0]
    trainer = _trainer(task, tmp_path / "compiled", longer, "grpo.compile_rollouts=true")
    compiled = trainer.batches.train_batch(0)[0]
    assert torch.equal(eager["input_ids"], compiled["input_ids"])
    assert trainer._rollout_compiled()._step.built > 0  # the rollout really ran through compiled packages
