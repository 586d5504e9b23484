"""grpo: the loss formulas against hand-computed numbers, advantages, masks on tool outputs, packing, the
multi-turn tool handler, the format environment, and on the tiny model a few GRPO steps that raise a
learnable reward, plus an exact resume."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from rust_crate import write_crate

from rustforge.config import (
    ConfigError,
    CurriculumPhase,
    GrpoConfig,
    RunConfig,
    from_dict,
)
from rustforge.data import harmony as H
from rustforge.data.packing import IGNORE_INDEX
from rustforge.rollout.engine import Completion, SequenceState
from rustforge.rollout.environments import (
    HarmonyFormatEnvironment,
    Prompt,
    Session,
    TokenShareEnvironment,
)
from rustforge.rollout.multiturn import (
    EpisodeLog,
    EpisodeResult,
    ToolTurns,
    episode_format,
)
from rustforge.train import grpo as G
from rustforge.train.metrics import read_metrics


# ------------------------------------------------------------------------------------ loss formulas
def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    std = math.sqrt(4 * 0.5**2 / 3)  # unbiased, as torch.std
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert G.group_advantages(rewards, 4, "group").tolist() == pytest.approx(want)
    assert G.group_advantages(rewards, 4, "none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    batch_std = float(rewards.std())
    assert G.group_advantages(rewards, 4, "batch").tolist() == pytest.approx([0.5 / (batch_std + 1e-4) * s for s in (1, -1, -1, 1)] + [0] * 4)
    with pytest.raises(ValueError, match="not groups of 3"):
        G.group_advantages(rewards, 3)


LOGP = [[-1.0, -2.0], [-0.5, -3.0]]
OLD = [[-1.1, -1.5], [-0.1, -3.0]]
REF = [[-1.2, -2.0], [-0.4, 0.0]]
ADV = [1.0, -2.0]
MASK = [[1, 1], [1, 0]]
EPS, EPS_HIGH, MAX_LEN = 0.2, 0.28, 4


def hand_token_losses(beta=0.0):
    """TRL's per-token loss written out with math.exp, token by token."""
    out = [[None, None], [None, None]]
    for i in range(2):
        for t in range(2):
            ratio = math.exp(LOGP[i][t] - OLD[i][t])
            clipped = min(max(ratio, 1 - EPS), 1 + EPS_HIGH)
            loss = -min(ratio * ADV[i], clipped * ADV[i])
            delta = REF[i][t] - LOGP[i][t]
            out[i][t] = loss + beta * (math.exp(delta) - delta - 1)
    return out


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_loss_types_against_hand_computed_numbers(beta):
    losses = hand_token_losses(beta)
    # token (1,0): ratio e^-0.4 = 0.670 < 0.8 with A < 0: the clipped term 0.8 * -2 wins, loss 1.6
    assert losses[1][0] == pytest.approx(1.6 + beta * (math.exp(0.1) - 1.1))
    kept = [losses[0][0], losses[0][1], losses[1][0]]
    want = {
        "grpo": ((losses[0][0] + losses[0][1]) / 2 + losses[1][0] / 1) / 2,
        "dr_grpo": sum(kept) / (2 * MAX_LEN),
        "dapo": sum(kept) / 3,
    }
    if beta == 0:
        assert want["grpo"] == pytest.approx(0.3720745, abs=1e-6)
        assert want["dapo"] == pytest.approx(-0.0372340, abs=1e-6)
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    for loss_type, value in want.items():
        got = G.grpo_loss(t(LOGP), t(OLD), t(ADV), t(MASK), loss_type, EPS, EPS_HIGH, MAX_LEN, beta, t(REF) if beta else None)
        assert float(got) == pytest.approx(value, abs=1e-12), loss_type


def test_clip_flags_and_the_policy_gradient_at_ratio_one():
    logp = torch.tensor([0.0, 0.0, -1.0, 1.0], requires_grad=True)
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    obj = G.clipped_objective(logp, old, adv, 0.2, 0.28)
    assert obj.low_clipped.tolist() == [False, False, True, False]  # ratio e^-1 < 0.8 and A < 0
    assert obj.high_clipped.tolist() == [False, False, False, True]  # ratio e > 1.28 and A > 0
    obj.loss.sum().backward()
    # unclipped tokens at ratio 1: d loss / d logp = -A (REINFORCE); clipped ones get no gradient
    assert logp.grad.tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])


def test_token_weights():
    counts = torch.tensor([3, 0, 5])
    assert G.token_weights(counts, "grpo", 10).tolist() == pytest.approx([1 / 9, 1 / 3, 1 / 15])
    assert G.token_weights(counts, "dr_grpo", 10).tolist() == pytest.approx([1 / 30] * 3)
    assert G.token_weights(counts, "dapo", 10).tolist() == pytest.approx([1 / 8] * 3)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="grpo.loss_type"):
        from_dict(RunConfig, {"grpo": {"loss_type": "ppo"}}, source="run.yaml")
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        from_dict(RunConfig, {"grpo": {"num_generations": 1}})
    with pytest.raises(ConfigError, match="rollout.weights"):
        from_dict(RunConfig, {"rollout": {"weights": "fast"}})
    cfg = from_dict(RunConfig, {"grpo": {"epsilon_high": 0.28, "loss_type": "grpo"}, "rollout": {"max_batch": 8}})
    assert cfg.grpo.epsilon_high == 0.28 and cfg.rollout.max_batch == 8


# ---------------------------------------------------------------------------- masks and packing
def completion(prompt, output, mask, reason="stop"):
    return Completion(list(prompt), list(output), list(mask), [0.0] * len(output), reason)


def test_tool_output_tokens_are_masked_and_packing_keeps_episodes_apart():
    # prompt 3 tokens; the model writes 2, a tool answers with 3 (+ <|start|>assistant), the model writes 2
    results = [
        EpisodeResult(completion([5, 6, 7], [10, 11, 20, 21, 22, 12, 13], [1, 1, 0, 0, 0, 1, 1]), EpisodeLog()),
        EpisodeResult(completion([8, 9], [14, 15, 16], [1, 1, 1], reason="length"), EpisodeLog()),
    ]
    arrays = [G.episode_arrays(r, 64, mask_truncated=False) for r in results]
    assert arrays[0][1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    episodes = [G.Episode(ids, trained, adv, 0.5) for (ids, trained), adv in zip(arrays, (1.0, -1.0))]
    (batch,) = G.pack_episodes(episodes, 16, 64)
    assert batch["input_ids"].shape == (1, 16)
    ids, labels, docs = batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["doc_ids"][0].tolist()
    assert docs == [0] * 10 + [1] * 5 + [-1]
    assert ids[:10] == [5, 6, 7, 10, 11, 20, 21, 22, 12, 13]
    # position t is trained iff token t+1 was sampled: never a tool token, never across the episode boundary
    assert labels[:10] == [IGNORE_INDEX, IGNORE_INDEX, 10, 11, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 12, 13, IGNORE_INDEX]
    assert labels[10:] == [IGNORE_INDEX, 14, 15, 16, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["position_ids"][0, 10:15].tolist() == [0, 1, 2, 3, 4]
    assert batch["advantages"][0, :10].unique().tolist() == [1.0] and batch["advantages"][0, 10] == -1.0
    # DAPO's mask_truncated_completions drops the episode cut by its budget
    assert G.episode_arrays(results[1], 64, mask_truncated=True)[1].sum() == 0


def test_micro_batches_respect_the_token_budget():
    rng = np.random.default_rng(0)
    episodes = [G.Episode(rng.integers(0, 50, n), np.ones(n, np.int8), 0.0, 1.0) for n in rng.integers(5, 60, 30)]
    batches = G.pack_episodes(episodes, 64, 128)
    assert all(b["input_ids"].numel() <= 128 or b["input_ids"].shape[0] == 1 for b in batches)
    placed = sorted(p.episode for b in batches for p in b["placements"])
    assert placed == list(range(30))
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches) == sum(e.trained_tokens for e in episodes)
    with pytest.raises(ValueError, match="does not fit seq_len"):
        G.pack_episodes([G.Episode(np.zeros(70, np.int64), np.ones(70, np.int8), 0.0, 1.0)], 64, 128)


# --------------------------------------------------------------------------------- tools, format
@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from rustforge.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_base[1] / "run" / "base")


class FakeTools:
    def __init__(self):
        self.calls = []

    def call(self, name, arguments):
        self.calls.append((name, arguments))
        return "error: no such test" if "missing" in arguments else "test tests::adds ... ok"


def test_tool_turns_run_the_call_and_render_its_answer(tokenizer):
    prompt = H.render_prompt([H.Message("user", "Fix it.")], tokenizer)
    author = [tokenizer.start_id] + tokenizer.encode("assistant", allow_special=False)
    call = H.render_conversation([H.tool_call_message("cargo_test", {"test_name": "adds"})], tokenizer, for_training=False).ids
    assert call[: len(author)] == author and call[-1] == tokenizer.call_id
    ids = prompt + call[len(author) :]  # what the model samples after `<|start|>assistant`
    tools = FakeTools()
    handler = ToolTurns(tokenizer, [tools], max_turns=2)
    state = SequenceState(0, 0, list(ids), len(prompt), max_new_tokens=200, max_len=4096)
    answer = H.tool_result_message("cargo_test", "test tests::adds ... ok")
    assert handler(state) == H.render_conversation([answer], tokenizer, for_training=False).ids + author
    assert tools.calls == [("cargo_test", '{"test_name": "adds"}')]
    state.turns = 2  # turn budget spent: the call is not run
    assert handler(state) is None and handler.logs[0].ended_by == "turn_budget" and len(tools.calls) == 1
    state.turns, state.max_new_tokens = 0, state.new_tokens + 3  # no token budget left to read an answer
    assert handler(state) is None and handler.logs[0].ended_by == "token_budget"
    final = H.render_conversation([H.Message("assistant", "Done.", channel="final")], tokenizer).ids
    assert handler(SequenceState(0, 0, prompt + final[len(author) :], len(prompt), 200, 4096)) is None
    assert handler.logs[0].ended_by == "answer"


def test_episode_format_judges_each_assistant_turn(tokenizer):
    author = [tokenizer.start_id] + tokenizer.encode("assistant", allow_special=False)

    def model_part(messages, for_training=False):
        return H.render_conversation(messages, tokenizer, for_training=for_training).ids[len(author) :]

    turn1 = model_part([H.Message("assistant", "Run the tests.", channel="analysis")])
    call = model_part([H.tool_call_message("cargo_test", {})])
    tool = H.render_conversation([H.tool_result_message("cargo_test", "ok")], tokenizer, for_training=False).ids + author
    final = model_part([H.Message("assistant", "Fixed.", channel="final")], for_training=True)
    output = call + tool + final
    good = completion([1], output, [1] * len(call) + [0] * len(tool) + [1] * len(final))
    fmt = episode_format(good, tokenizer, ["cargo_test"])
    assert fmt.compliant and fmt.has_final and fmt.tool_calls == 1 and fmt.valid_tool_calls == 1, fmt.problems
    # the same tokens, but the tool's answer counted as the model's: not one valid assistant turn
    assert not episode_format(completion([1], output, [1] * len(output)), tokenizer, ["cargo_test"]).compliant
    thinking = turn1 * 3
    cut = completion([1], thinking, [1] * len(thinking), reason="length")
    fmt = episode_format(cut, tokenizer, ["cargo_test"], reasoning_token_budget=5)
    assert not fmt.compliant and fmt.endless_reasoning and not fmt.has_final

    from rustforge.config import RewardConfig

    env = HarmonyFormatEnvironment({"train": []}, tokenizer, RewardConfig(analysis_token_budget=5))
    prompts = [Prompt("a", [1], ["cargo_test"])] * 2
    scores = env.score(prompts, [EpisodeResult(good, EpisodeLog()), EpisodeResult(cut, EpisodeLog())], [Session()] * 2)
    assert scores[0].total == pytest.approx(0.2) and scores[0].passed  # RewardConfig().harmony_format
    assert scores[1].total == pytest.approx(-0.8) and not scores[1].passed  # endless_reasoning penalty


# ------------------------------------------------------------------------------- the tiny model
class TokenSetEnvironment(TokenShareEnvironment):
    """A learnable reward for a random tiny model: the share of sampled tokens whose id is a multiple of 8."""

    TEXTS = ("fn main", "let x = 1;", "struct Foo", "impl Bar", "match y", "use std::io;", "pub fn f()", "enum E",
             "mod m;", "trait T", "const C: u8 = 0;", "static S", "type A = B;", "where", "loop {}", "while x")  # fmt: skip

    def __init__(self, tokenizer):
        prompts = [Prompt(f"p{i}", H.render_prompt([H.Message("user", t)], tokenizer)) for i, t in enumerate(self.TEXTS)]
        super().__init__({"train": prompts[:12], "val": prompts[12:]}, modulus=8)


def _run_config(tiny_base, name: str) -> RunConfig:
    cfg_dict, root = tiny_base
    run_dir = root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    shutil.copytree(root / "run" / "base", run_dir / "base")
    cfg = from_dict(RunConfig, {**cfg_dict, "run_dir": str(run_dir), "rollout": {"max_batch": 32}})
    cfg.expert_monitor.every_steps = 0
    return cfg


def _grpo_config(steps: int, **overrides) -> GrpoConfig:
    settings = dict(
        lr=1e-2, warmup_steps=0, phases=[CurriculumPhase(128, steps)], init_from="none", prompts_per_step=4,
        num_generations=8, max_prompt_length=64, max_completion_length=16, eval_every=100, save_every=2,
        val_prompts=4, loss_type="dapo",
    )  # fmt: skip
    return GrpoConfig(**{**settings, **overrides})


def test_grpo_steps_raise_a_learnable_reward(tiny_base, tokenizer):
    cfg = _run_config(tiny_base, "grpo_learn")
    result = G.run(cfg, _grpo_config(12), progress=False, environment=TokenSetEnvironment(tokenizer))
    train = read_metrics(cfg.run_dir + "/grpo/logs/metrics.jsonl")
    rewards = [train[s]["reward"] for s in sorted(train)]
    # greedy held-out episodes: about 1 in 8 tokens on target before (random model), most of them after
    assert result["reward_start"] < 0.3 and result["reward_end"] > result["reward_start"] + 0.3, result
    # sampled training episodes (temperature 1) move the same way
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.03, rewards
    last = train[max(train)]
    for key in ("kl", "clip_ratio_region", "rollout_tok_s", "train_tok_s", "memory_gb", "reward/token_share",
                "completion_length", "frac_reward_zero_std"):  # fmt: skip
        assert key in last and math.isfinite(last[key]), key
    assert last["kl"] > 0  # the adapter moved away from the LoRA-disabled reference
    assert (tiny_base[1] / "grpo_learn" / "grpo" / "adapter" / "adapter_config.json").is_file()  # for the next stage


def test_grpo_resume_gives_the_uninterrupted_run(tiny_base, tokenizer):
    """Killed after 2 steps and resumed: the same rollouts, losses and rewards as one run of 3 steps.
    num_iterations = 2 and beta > 0: pi_old and the reference log-probs are on this path too."""
    stage = _grpo_config(3, num_iterations=2, beta=0.05, loss_type="grpo", lr=3e-3, prompts_per_step=2, num_generations=4)
    whole = _run_config(tiny_base, "grpo_whole")
    G.run(whole, stage, progress=False, environment=TokenSetEnvironment(tokenizer))
    parts = _run_config(tiny_base, "grpo_parts")
    G.run(parts, stage, progress=False, stop_after=2, environment=TokenSetEnvironment(tokenizer))
    G.run(parts, stage, resume=True, progress=False, environment=TokenSetEnvironment(tokenizer))
    a = read_metrics(whole.run_dir + "/grpo/logs/metrics.jsonl")
    b = read_metrics(parts.run_dir + "/grpo/logs/metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in ("reward", "loss", "kl", "completion_length"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_the_grpo_benchmark_plan_runs_on_cpu(tmp_path):
    """bench/rollout.py --plan grpo (the lead runs it on the H100 with the 20B shape): real steps and the
    context ladder run, every record ok."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_rollout", Path(__file__).resolve().parents[1] / "bench" / "rollout.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "grpo.jsonl"
    argv = ["--plan", "grpo", "--preset", "tiny", "--device", "cpu", "--prompt-len", "8", "--new-tokens", "4",
            "--grpo-prompts", "2", "--grpo-generations", "2", "--grpo-seqs", "32", "64", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    events = [r.get("event") for r in records if r["record"] == "grpo"]
    assert events == ["build", "grpo_step", "grpo_context", "grpo_context"]
    assert all(r.get("ok", True) for r in records), records
    step = next(r for r in records if r.get("event") == "grpo_step")
    assert step["rollout_tok_s"] > 0 and step["train_tok_s"] > 0


# ------------------------------------------------------------------------- the Rust task environment


@pytest.mark.skipif(shutil.which("bwrap") is None or shutil.which("cargo") is None, reason="needs bubblewrap and cargo")
def test_rust_task_environment_runs_real_tools_and_rewards(tmp_path, tokenizer):
    """A mined task; two scripted episodes through ToolTurns with the real tools in the sandbox: one applies
    the reference patch and answers (every test passes), one answers without fixing anything."""
    from rustforge.rollout.environments import RustTaskEnvironment
    from rustforge.rust import tasks as T
    from rustforge.rust.sandbox import Sandbox, SandboxConfig

    write_crate(tmp_path / "crates" / "grpocrate", "grpocrate")
    sandbox = Sandbox(SandboxConfig(timeout_s=120))
    mining = T.TaskMiningConfig(kinds=["operator"], workers=1, max_tasks_per_crate=2, val_fraction=0.0)
    T.mine_tasks([tmp_path / "crates"], tmp_path / "tasks", mining, sandbox, progress=False)
    task = T.load_tasks(tmp_path / "tasks")[0]
    env = RustTaskEnvironment({"train": [task]}, tokenizer, sandbox, reward_workers=2, work_root=tmp_path / "work")
    try:
        (prompt,) = env.prompts("train")
        assert "apply_patch" in prompt.tool_names and prompt.ids[-1] == tokenizer.encode("assistant", allow_special=False)[-1]
        author = [tokenizer.start_id] + tokenizer.encode("assistant", allow_special=False)

        def model_part(message, for_training=False):
            return H.render_conversation([message], tokenizer, for_training=for_training).ids[len(author) :]

        sessions = [env.open(prompt), env.open(prompt)]
        handler = ToolTurns(tokenizer, [s.tools for s in sessions], max_turns=2)
        call = model_part(H.tool_call_message("apply_patch", {"patch": task.reference_patch}))
        state = SequenceState(0, 0, prompt.ids + call, len(prompt.ids), 4000, 100_000)
        answer = handler(state)  # the real tool, on episode 0's workspace
        assert "error" not in tokenizer.decode(answer) and answer[-len(author) :] == author
        final = model_part(H.Message("assistant", "Fixed the comparison.", channel="final"), for_training=True)
        fixed = completion(prompt.ids, call + answer + final, [1] * len(call) + [0] * len(answer) + [1] * len(final))
        unfixed = completion(prompt.ids, final, [1] * len(final))
        results = [EpisodeResult(fixed, handler.logs[0]), EpisodeResult(unfixed, handler.logs[1])]
        scores = env.score([prompt, prompt], results, sessions)
        for session in sessions:
            session.close()
    finally:
        env.close()
    assert scores[0].passed and scores[0].compliant and scores[0].parts["all_tests_pass"] > 0, scores[0]
    assert scores[0].parts["patch_size"] == 0 and scores[0].tool_calls == 1
    assert not scores[1].passed and scores[1].parts["compiles"] > 0 and scores[1].parts["all_tests_pass"] == 0
    assert scores[0].total > scores[1].total
