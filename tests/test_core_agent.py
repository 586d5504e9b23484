"""core_agent: assistant-only labels, whole-conversation packing, held-out sampling metrics, and on the tiny
model the issue's done-when -- SFT raises the Harmony compliance of greedy completions on held-out prompts
to >= 95% -- plus an exact resume.

The trajectories are templated here (rust/trajectories.py needs cargo in a sandbox per task): a bug report
about a small Rust function with varied name, types and operator, a cargo_test call whose (templated)
output shows the code, and the assistant's diagnosis and answer. They go through the product path:
written with trajectories.write_trajectories, read back by the stage from its config's JSONL files.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rustforge.config import CoreAgentConfig, CurriculumPhase, RunConfig, from_dict
from rustforge.data import harmony as H
from rustforge.data.packing import IGNORE_INDEX
from rustforge.eval.sampling import Sample, format_metrics, sample_completions
from rustforge.train import core_agent as CA
from rustforge.train.metrics import read_metrics
from rustforge.train.sft import initial_adapter

TOOLS = [{"name": "cargo_test", "description": "Run cargo test.", "parameters": {"type": "object", "properties": {}}}]
NAMES = ["add", "sub", "scale", "clamp_to", "count_below", "max_of", "min_of", "sum_all", "area", "mix", "shift", "half"]
OPS = {"arith": [("+", "-"), ("-", "+"), ("*", "/")], "cmp": [("<", "<="), (">", ">=")], "logic": [("&&", "||"), ("||", "&&")]}
TYPES = ["i32", "u64", "usize", "f64", "i64"]
# one phrase per situation: the untrained tiny base cannot learn, in 80 CPU steps, which of several
# interchangeable phrases to continue greedily, and mixes them -- that is content, not format
DIAGNOSIS = {"arith": "Wrong arithmetic operator.", "cmp": "Bad comparison.", "logic": "Flipped logic."}


def agent_conversation(rng: random.Random) -> H.Conversation:
    kind = rng.choice(sorted(OPS))
    name, (bad, _), ty = rng.choice(NAMES), rng.choice(OPS[kind]), rng.choice(TYPES)
    test = f"{name}_{rng.choice(['works', 'basic', 'edge', 'small'])}"
    snippet = f"pub fn {name}(a: {ty}, b: {ty}) -> {ty} {{\n    a {bad} b\n}}"
    return H.Conversation([
        H.system_message(reasoning_effort="low", model_identity=None, knowledge_cutoff=None),
        H.developer_message("Fix the Rust crate.", TOOLS),
        H.Message("user", f"The test `{test}` fails. Please fix `{name}`."),
        H.Message("assistant", "Run the tests first.", channel="analysis"),
        H.tool_call_message("cargo_test", {}),
        H.tool_result_message("cargo_test", f"test tests::{test} ... FAILED\n{snippet}"),
        H.Message("assistant", DIAGNOSIS[kind], channel="analysis"),
        H.Message("assistant", "Fixed it; all tests pass.", channel="final"),
    ])  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from rustforge.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_base[1] / "run" / "base")


def _fresh_run(tiny_base, name: str) -> RunConfig:
    cfg_dict, root = tiny_base
    run_dir = root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    shutil.copytree(root / "run" / "base", run_dir / "base")
    cfg = from_dict(RunConfig, {**cfg_dict, "run_dir": str(run_dir)})
    cfg.expert_monitor.every_steps = 0
    return cfg


def _write_data(run_dir: Path, train: int, val: int) -> tuple[str, str]:
    from rustforge.rust.trajectories import write_trajectories

    rng = random.Random(0)
    write_trajectories(run_dir / "train.jsonl", [agent_conversation(rng) for _ in range(train)])
    rng = random.Random(1000)
    write_trajectories(run_dir / "val.jsonl", [agent_conversation(rng) for _ in range(val)])
    return str(run_dir / "train.jsonl"), str(run_dir / "val.jsonl")


# ------------------------------------------------------------------------------------- labels, packing
def test_labels_are_the_next_token_only_where_the_assistant_writes_it(tokenizer):
    convs = [agent_conversation(random.Random(seed)) for seed in (1, 2)]
    items = [CA.conversation_item(c, tokenizer) for c in convs]
    seq = CA.item_sequence(items, [0, 1])
    first = len(items[0])
    assert seq.doc_ids.tolist() == [0] * first + [1] * len(items[1])
    assert seq.position_ids[first] == 0 and seq.position_ids[first - 1] == first - 1
    for offset, item in ((0, items[0]), (first, items[1])):
        n = len(item)
        want = [item.ids[t + 1] if item.loss_mask[t + 1] else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX]
        assert seq.labels[offset : offset + n].tolist() == want
    # by message (system, developer, user, analysis, call, tool result, analysis, final): the prompt
    # supplies `<|start|>assistant` of a turn, the model writes what follows it, and after its analysis
    # <|end|> it writes the next `<|start|>` itself; nothing of a tool result is a target
    ids, labels = items[0].ids.tolist(), seq.labels[:first].tolist()
    starts = [i for i, t in enumerate(ids) if t == tokenizer.start_id]
    assert len(starts) == 8
    assert labels[starts[3] - 1] == IGNORE_INDEX  # user's <|end|> -> <|start|> of the turn: prompt
    channel_at = ids.index(tokenizer.channel_id, starts[3])
    assert labels[channel_at - 1] == tokenizer.channel_id and labels[starts[3]] == IGNORE_INDEX
    assert labels[starts[4] - 1] == tokenizer.start_id  # analysis <|end|> -> the model's own <|start|>
    assert ids[starts[5] - 1] == tokenizer.call_id
    author = 1 + len(tokenizer.encode("assistant", allow_special=False))  # `<|start|>assistant`
    assert all(label == IGNORE_INDEX for label in labels[starts[5] - 1 : starts[6] + author - 1])
    assert labels[starts[6] + author - 1] == tokenizer.channel_id  # the turn's header: the model's
    assert labels[-2] == tokenizer.return_id and labels[-1] == IGNORE_INDEX


def test_train_channels_limit_the_loss(tokenizer):
    conv = agent_conversation(random.Random(3))
    full = CA.conversation_item(conv, tokenizer)
    final_only = CA.conversation_item(conv, tokenizer, train_channels=["final"])
    assert 0 < final_only.loss_mask.sum() < full.loss_mask.sum()
    ids = final_only.ids.tolist()
    assert final_only.loss_mask[ids.index(tokenizer.call_id)] == 0  # the tool call is on commentary


def test_long_conversations_are_cut_at_a_message_boundary_or_dropped(tokenizer):
    item = CA.conversation_item(agent_conversation(random.Random(4)), tokenizer)
    starts = np.flatnonzero(item.ids == tokenizer.start_id)
    seq_len = int(starts[-2]) + 3  # room for all but the last message, and a bit of it
    cut = CA.fit_conversation(item, seq_len, "truncate", tokenizer.start_id)
    assert len(cut) == starts[-2] and cut.ids[-1] == tokenizer.end_id  # ends after a whole message
    assert cut.loss_mask.tolist() == item.loss_mask[: len(cut)].tolist()
    assert CA.fit_conversation(item, seq_len, "drop", tokenizer.start_id) is None
    assert CA.fit_conversation(item, len(item), "drop", tokenizer.start_id) is item
    prompt_only = int(starts[3]) + 2  # system, developer, user: no assistant token left to learn
    assert CA.fit_conversation(item, prompt_only, "truncate", tokenizer.start_id) is None
    kept, counts = CA.fit_conversations([item, item], seq_len, "truncate", tokenizer.start_id)
    assert counts == {"conversations": 2, "truncated": 2, "dropped": 0} and len(kept) == 2


def test_turn_prompts_end_where_the_assistant_starts_a_turn(tokenizer):
    convs = [agent_conversation(random.Random(seed)) for seed in (5, 6)]
    assert [len(p) for p in CA.turn_prompts(convs[0])] == [3, 6]
    prompts = CA.eval_prompts(convs, tokenizer, 3)
    assert len(prompts) == 3 and all(p.tool_names == ["cargo_test"] for p in prompts)
    suffix = [tokenizer.start_id] + tokenizer.encode("assistant")
    assert all(p.ids[-len(suffix) :] == suffix for p in prompts)
    # spread over conversations: first turns of both, then a second turn
    assert prompts[0].ids == H.render_prompt(CA.turn_prompts(convs[0])[0], tokenizer)
    assert prompts[1].ids == H.render_prompt(CA.turn_prompts(convs[1])[0], tokenizer)
    assert prompts[2].ids == H.render_prompt(CA.turn_prompts(convs[0])[1], tokenizer)


def test_held_out_split_is_by_content(tokenizer):
    convs = [agent_conversation(random.Random(seed)) for seed in range(40)]
    train, held = CA.split_held_out(convs, 0.25)
    assert 0 < len(held) < 20 and len(train) + len(held) == 40
    _, again_held = CA.split_held_out(list(reversed(convs)), 0.25)
    assert {id(c) for c in held} == {id(c) for c in again_held}


# ------------------------------------------------------------------------------------------ sampling
def _completion(tokenizer, messages, cut: int | None = None) -> Sample:
    """The ids the model would write after `<|start|>assistant` for these assistant messages."""
    ids = H.render_conversation(messages, tokenizer, for_training=True).ids
    ids = ids[1 + len(tokenizer.encode("assistant", allow_special=False)) :]  # the prompt's `<|start|>assistant`
    stopped = cut is None
    return Sample([1], ids[:cut] if cut else ids, stopped)


def test_format_metrics_on_known_completions(tokenizer):
    analysis = H.Message("assistant", "Run the tests first.", channel="analysis")
    final = H.Message("assistant", "Fixed it.", channel="final")
    good_call = _completion(tokenizer, [analysis, H.tool_call_message("cargo_test", {})])
    good_final = _completion(tokenizer, [analysis, final])
    bad_json = _completion(tokenizer, [H.tool_call_message("cargo_test", "{not json")])
    unknown_tool = _completion(tokenizer, [H.tool_call_message("rm_rf", {})])
    endless = _completion(tokenizer, [H.Message("assistant", "Hmm " * 40, channel="analysis")], cut=30)
    # the parser reads these leniently, validate_completion flags them: a header token inside content,
    # <|call|> ending a message that calls nothing
    ids = good_final.completion_ids
    in_final = len(ids) - 1 - ids[::-1].index(tokenizer.message_id) + 2
    stray = Sample([1], ids[:in_final] + [tokenizer.channel_id] + ids[in_final:], True)
    call_end = Sample([1], good_final.completion_ids[:-1] + [tokenizer.call_id], True)
    samples = [good_call, good_final, bad_json, unknown_tool, endless, stray, call_end]
    metrics = format_metrics(samples, tokenizer, [["cargo_test"]] * len(samples))
    assert metrics["harmony_compliance"] == pytest.approx(2 / 7)
    assert metrics["valid_tool_call_rate"] == pytest.approx(1 / 3)  # good_call of three tool calls
    assert metrics["endless_reasoning_rate"] == pytest.approx(1 / 7)
    assert metrics["stop_rate"] == pytest.approx(6 / 7)


def test_batched_greedy_sampling_matches_one_at_a_time_and_keeps_rng(tiny_base, tokenizer):
    from rustforge.model.base import prepare_base

    cfg = from_dict(RunConfig, tiny_base[0])
    model, _ = prepare_base(cfg, torch.device("cpu"), progress=False)
    with torch.no_grad():  # a non-zero adapter: the LoRA path must be in what generate runs
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    prompts = [p.ids for p in CA.eval_prompts([agent_conversation(random.Random(s)) for s in (7, 8)], tokenizer, 3)]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    rng_before, mode_before = torch.get_rng_state(), model.hf.training
    one = sample_completions(model, prompts, tokenizer, max_new_tokens=12, batch_size=1)
    batched = sample_completions(model, prompts, tokenizer, max_new_tokens=12, batch_size=3)
    assert [s.completion_ids for s in one] == [s.completion_ids for s in batched]
    assert all(len(s.completion_ids) == 12 or s.stopped for s in one)
    hot = [sample_completions(model, prompts[:1], tokenizer, 12, temperature=1.0, seed=s)[0] for s in (1, 1, 2)]
    assert hot[0].completion_ids == hot[1].completion_ids != hot[2].completion_ids
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert model.hf.training == mode_before and model.hf.config._attn_implementation == "eager"


# ---------------------------------------------------------------------------------- the done-when
@pytest.mark.slow
def test_core_agent_raises_harmony_compliance_on_held_out_prompts(tiny_base):
    cfg = _fresh_run(tiny_base, "agent")
    train_path, val_path = _write_data(Path(cfg.run_dir), train=200, val=12)
    stage = CoreAgentConfig(
        trajectories=[train_path], val_trajectories=[val_path], init_from="none",
        lr=5e-3, warmup_steps=3, batch_size=2, phases=[CurriculumPhase(420, 80)], eval_every=80, eval_batches=2,
        save_every=80, sample_prompts=24, sample_max_new_tokens=64, sample_batch_size=12,
    )  # fmt: skip
    result = CA.run(cfg, stage, progress=False)
    # measured: compliance 0.0 -> 1.0, val loss 7.26 -> ~0.05 (80 steps, ~35 s on one core)
    assert result["harmony_compliance_start"] <= 0.1
    assert result["harmony_compliance_end"] >= 0.95, result
    assert result["valid_tool_call_rate_end"] >= 0.95 and result["endless_reasoning_rate_end"] == 0.0
    assert result["val_loss_end"] < result["val_loss_start"] - 5
    val = read_metrics(Path(cfg.run_dir) / "core_agent" / "logs" / "metrics.jsonl", "val")
    assert sorted(val) == [0, 80] and val[80]["samples"] == 24
    assert (Path(cfg.run_dir) / "core_agent" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_continues_exactly(tiny_base):
    """Two steps, stop, resume for two more == four straight (seq_len 256 < a conversation: truncation)."""
    losses = {}
    for name, calls in (("straight", [None]), ("resumed", [2, None])):
        cfg = _fresh_run(tiny_base, f"agent-{name}")
        train_path, val_path = _write_data(Path(cfg.run_dir), train=12, val=2)
        stage = CoreAgentConfig(
            trajectories=[train_path], val_trajectories=[val_path], init_from="none", lr=5e-3, warmup_steps=1,
            batch_size=1, phases=[CurriculumPhase(256, 2), CurriculumPhase(300, 2)], eval_every=100,
            eval_batches=1, save_every=2, sample_prompts=0,
        )  # fmt: skip
        for i, stop_after in enumerate(calls):
            CA.run(cfg, stage, resume=i > 0, progress=False, stop_after=stop_after)
        train = read_metrics(Path(cfg.run_dir) / "core_agent" / "logs" / "metrics.jsonl", "train")
        losses[name] = [train[s]["loss"] for s in sorted(train)]
        assert [train[s]["seq_len"] for s in sorted(train)] == [256, 256, 300, 300]
    assert losses["resumed"] == pytest.approx(losses["straight"], rel=1e-6, abs=1e-6)


def test_validation_batches_hold_only_whole_conversations(tokenizer):
    items = [CA.conversation_item(agent_conversation(random.Random(s)), tokenizer) for s in range(6)]
    batches = CA.validation_batches(items, 1024, batch_size=2, max_batches=1, pad_id=tokenizer.pad_id, seed=0)
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (2, 1024)
    packed = CA.pack_items(items, 1024)
    labels = sum(int((packed.sequence(i).labels != IGNORE_INDEX).sum()) for i in range(len(packed)))
    assert packed.stats.loss_tokens == labels and packed.stats.docs == 6
    doc_lengths = sorted(int((batches[0]["doc_ids"][r] == d).sum()) for r in range(2) for d in range(3))
    assert set(doc_lengths) - {0} <= {len(it) for it in items}


def test_config_errors_name_the_field_and_a_missing_previous_adapter_is_explained(tmp_path):
    from rustforge.config import ConfigError

    cfg = from_dict(CoreAgentConfig, {"phases": [{"seq_len": 512, "steps": 3}], "train_channels": ["final"]})
    assert cfg.phases == [CurriculumPhase(512, 3)] and cfg.train_channels == ["final"]
    with pytest.raises(ConfigError, match="run.yaml: core_agent: .*long_conversations"):
        from_dict(CoreAgentConfig, {"long_conversations": "split"}, source="run.yaml", prefix="core_agent")
    with pytest.raises(ConfigError, match="train_channels"):
        from_dict(CoreAgentConfig, {"train_channels": ["thinking"]}, source="run.yaml", prefix="core_agent")
    with pytest.raises(FileNotFoundError, match="core_agent.init_from: .*run the lang_rust stage first"):
        initial_adapter(tmp_path, "previous", "lang_rust", "core_agent.init_from")
    assert initial_adapter(tmp_path, "none", "lang_rust", "core_agent.init_from") is None
    (tmp_path / "lang_rust" / "adapter").mkdir(parents=True)
    (tmp_path / "lang_rust" / "adapter" / "adapter_config.json").write_text("{}")
    assert initial_adapter(tmp_path, "previous", "lang_rust", "x") == tmp_path / "lang_rust" / "adapter"


def test_bad_trajectory_file_is_an_error_naming_it(tmp_path, tokenizer):
    from rustforge.rust.trajectories import TrajectoryError, write_trajectories

    conv = agent_conversation(random.Random(9))
    broken = H.Conversation(conv.messages[:-1])  # ends on an analysis message: no final answer
    path = tmp_path / "trajectories.jsonl"
    write_trajectories(path, [conv, broken])
    with pytest.raises(TrajectoryError, match="trajectories.jsonl: conversation 2: .*final"):
        CA.load_conversations([str(path)], [], tokenizer)


def test_expert_drift_baseline_is_the_base_model_without_the_adapter(tiny_base, tokenizer):
    """A stage that starts from an earlier adapter must measure routing drift from the base model: the
    trainer's probe base equals the LoRA-free model's routing, not the adapted one's."""
    from rustforge.config import ExpertMonitorConfig, TrainConfig
    from rustforge.model.base import prepare_base
    from rustforge.train.expert_monitor import probe_model_routing
    from rustforge.train.sft import SFTTrainer

    cfg = _fresh_run(tiny_base, "agent-drift")
    model, _ = prepare_base(cfg, torch.device("cpu"), progress=False)
    with torch.no_grad():  # a strong adapter, as a previous stage leaves one
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    convs = [agent_conversation(random.Random(s)) for s in range(4)]
    data = CA.stage_data(CoreAgentConfig(sample_prompts=0, batch_size=1, eval_batches=1), tokenizer, convs[:2], convs[2:])
    train_cfg = TrainConfig(phases=[CurriculumPhase(512, 1)], batch_size=1, eval_batches=1)
    monitor_cfg = ExpertMonitorConfig(every_steps=1)
    trainer = SFTTrainer(model, cfg.lora, train_cfg, data.stage, Path(cfg.run_dir) / "drift", torch.device("cpu"),
                         progress=False, monitor_cfg=monitor_cfg)  # fmt: skip
    trainer.run(stop_after=0)  # step-0 evaluation and the probe base, no step
    probe = [trainer.val_cache[512][0]]
    base, _ = prepare_base(cfg, torch.device("cpu"), progress=False, with_lora=False)
    base_counts = probe_model_routing(base.eval(), probe).numpy()
    adapted_counts = probe_model_routing(model.eval(), probe).numpy()
    assert not np.array_equal(adapted_counts, base_counts)  # the adapter changes the routing
    np.testing.assert_array_equal(trainer.monitor.base_counts, base_counts)
