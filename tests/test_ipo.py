"""ipo: the loss against TRL's formula, packed pair log-probs against separate full-logit forwards, the
reference as the LoRA-free model, pair rendering and limits, an exact resume, and on the tiny model the
issue's done-when: IPO raises the held-out preference accuracy above its start.

Pairs are templated here (rust/trajectories.make_preference_pair needs cargo in a sandbox): the prompt
reports a wrong operator in a small Rust function (varied name, operator, type, expected value); the
chosen completion blames the operator and patches it, the rejected one blames the test and deletes it.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rustforge.config import CurriculumPhase, IpoConfig, RunConfig, from_dict
from rustforge.data import harmony as H
from rustforge.model.lora import lora_disabled
from rustforge.rust.trajectories import PreferencePair
from rustforge.train import ipo as IPO
from rustforge.train.core_agent import item_sequence
from rustforge.train.metrics import read_metrics

TOOLS = [
    {
        "name": "apply_patch",
        "description": "Apply a unified diff.",
        "parameters": {"type": "object", "properties": {"patch": {"type": "string"}}, "required": ["patch"]},
    }
]
NAMES = ["add", "sub", "scale", "clamp_to", "count_below", "max_of", "min_of", "sum_all", "area", "mix", "shift", "half"]
OPS = [("+", "-"), ("-", "+"), ("*", "/"), ("<", "<="), (">", ">="), ("&&", "||")]
SMALL = {"max_length": 320, "max_prompt_length": 240, "phases": [CurriculumPhase(640, 1)]}


def preference_pair(rng: random.Random, index: int) -> PreferencePair:
    name, (bad, good), value = rng.choice(NAMES), rng.choice(OPS), rng.randint(2, 99)
    prompt = H.Conversation([
        H.system_message(reasoning_effort="low", model_identity=None, knowledge_cutoff=None),
        H.developer_message("Fix the Rust crate.", TOOLS),
        H.Message("user", f"`{name}` is wrong:\n    a {bad} b\nTest: assert_eq!({name}(a, b), {value});"),
    ])  # fmt: skip
    chosen = [H.Message("assistant", "The operator is wrong.", channel="analysis"),
              H.tool_call_message("apply_patch", {"patch": f"-    a {bad} b\n+    a {good} b"})]  # fmt: skip
    rejected = [H.Message("assistant", "The test is wrong.", channel="analysis"),
                H.tool_call_message("apply_patch", {"patch": f"-    assert_eq!({name}(a, b), {value});\n+"})]  # fmt: skip
    return PreferencePair(f"task{index}", prompt, chosen, rejected)


def _pairs(seed: int, count: int) -> list[PreferencePair]:
    rng = random.Random(seed)
    return [preference_pair(rng, seed + i) for i in range(count)]


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from rustforge.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_base[1] / "run" / "base")


@pytest.fixture(scope="module")
def model(tiny_base):
    """The tiny base with LoRA whose B factors are random: the adapter changes the model's outputs."""
    from rustforge.model.base import prepare_base

    model, _ = prepare_base(from_dict(RunConfig, tiny_base[0]), torch.device("cpu"), progress=False)
    _randomise_adapter(model, 0.02)
    return model.eval()


def _randomise_adapter(model, scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.rsplit(".", 1)[-1].endswith("_B"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


# ----------------------------------------------------------------------------------------------- loss
def trl_dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, loss_type):
    """TRL's DPOTrainer.dpo_loss for loss_type "ipo" and "sigmoid" (label_smoothing 0), written from its
    source: logits = pi_logratios - ref_logratios; ipo: (logits - 1/(2 beta))^2 (IPO paper Eq. 17);
    sigmoid: -logsigmoid(beta * logits). Rewards are beta * (policy - reference) log-probs."""
    pi_logratios = policy_chosen - policy_rejected
    ref_logratios = reference_chosen - reference_rejected
    logits = pi_logratios - ref_logratios
    if loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * logits)
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    return losses, chosen_rewards, rejected_rewards


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid"])
def test_loss_matches_trl_on_fixed_numbers(loss_type):
    policy_chosen = torch.tensor([-1.25, -0.50, -2.00, -0.75])
    policy_rejected = torch.tensor([-1.50, -0.25, -2.00, -3.00])
    reference_chosen = torch.tensor([-1.00, -0.60, -1.90, -1.00])
    reference_rejected = torch.tensor([-1.40, -0.20, -2.10, -2.50])
    beta = 0.1
    losses, logits = IPO.preference_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, loss_type
    )
    want, chosen_rewards, rejected_rewards = trl_dpo_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, loss_type
    )
    torch.testing.assert_close(losses, want)
    torch.testing.assert_close(logits, torch.tensor([-0.15, 0.15, -0.2, 0.75]), atol=1e-6, rtol=0)
    if loss_type == "ipo":  # by hand: (logits - 5)^2
        torch.testing.assert_close(losses, torch.tensor([26.5225, 23.5225, 27.04, 18.0625]), atol=1e-4, rtol=0)
    torch.testing.assert_close(chosen_rewards - rejected_rewards, beta * logits)
    with pytest.raises(ValueError, match="loss_type"):
        IPO.preference_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, "hinge")


def test_ipo_averages_token_logprobs_like_trl_and_sigmoid_sums():
    base = {"phases": [CurriculumPhase(1024, 1)], "max_length": 512, "max_prompt_length": 256}
    assert IpoConfig(**base).averages and not IpoConfig(loss_type="sigmoid", **base).averages
    assert not IpoConfig(average_logprobs=False, **base).averages
    with pytest.raises(ValueError, match="2 \\* max_length"):
        IpoConfig(phases=[CurriculumPhase(1000, 1)], max_length=512, max_prompt_length=256)
    with pytest.raises(ValueError, match="loss_type"):
        IpoConfig(loss_type="kto", **base)


# ------------------------------------------------------------------------------------------ log-probs
def _separate_logprobs(model, item) -> list[tuple[float, int]]:
    """Per document of the item: (sum of completion-token log-probs, count) from a plain full-logit
    forward of that document alone through transformers' model."""
    out, start = [], 0
    for length in item.segments:
        ids = torch.as_tensor(item.ids[start : start + length])[None]
        mask = torch.as_tensor(item.loss_mask[start : start + length]).bool()
        with torch.no_grad():
            logits = model.hf(input_ids=ids).logits[0].float()
        token_lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        scored = mask[1:]
        out.append((float(token_lp[scored].sum()), int(scored.sum())))
        start += length
    return out


def test_packed_pair_logprobs_equal_separate_forwards(model, tokenizer):
    cfg = IpoConfig(**SMALL)
    items = [IPO.pair_item(p, tokenizer, cfg) for p in _pairs(1, 2)]
    seq = item_sequence(items, [0, 1])  # two pairs, four documents, one row
    batch = {k: torch.as_tensor(getattr(seq, k))[None] for k in ("input_ids", "position_ids", "doc_ids", "labels")}
    with torch.no_grad():
        summed = IPO.pair_logprobs(model, batch, average=False)
        averaged = IPO.pair_logprobs(model, batch, average=True)
    want = [_separate_logprobs(model, item) for item in items]
    want_chosen = torch.tensor([w[0][0] for w in want])
    want_rejected = torch.tensor([w[1][0] for w in want])
    torch.testing.assert_close(summed.chosen, want_chosen, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(summed.rejected, want_rejected, atol=2e-3, rtol=1e-4)
    counts = torch.tensor([[w[0][1], w[1][1]] for w in want], dtype=torch.float32)
    torch.testing.assert_close(torch.stack([summed.chosen_tokens, summed.rejected_tokens], 1), counts)
    torch.testing.assert_close(averaged.chosen, want_chosen / counts[:, 0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(summed.chosen, summed.rejected)


def test_pair_logprobs_skip_padding_rows_and_pairs():
    class Uniform:  # log-prob of every target: -1
        def token_logprobs(self, input_ids, position_ids, doc_ids, targets):
            return torch.where(targets != -100, -1.0, 0.0)

    doc_ids = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 1, 1, -1, -1, -1], [-1] * 8])
    labels = torch.where(doc_ids >= 0, 5, -100)
    labels[0, ::2] = -100  # the first token of each document is prompt
    batch = {"input_ids": labels.clamp(min=0), "position_ids": torch.zeros_like(doc_ids), "doc_ids": doc_ids, "labels": labels}
    out = IPO.pair_logprobs(Uniform(), batch, average=False)
    assert out.chosen.tolist() == [-1.0, -1.0, -3.0] and out.rejected.tolist() == [-1.0, -1.0, -2.0]
    assert IPO._pairs_in(batch) == 3


# ------------------------------------------------------------------------------------------ reference
def test_lora_disabled_is_the_base_model_and_restores(tiny_base, model):
    from rustforge.model.base import prepare_base

    base, _ = prepare_base(from_dict(RunConfig, tiny_base[0]), torch.device("cpu"), progress=False, with_lora=False)
    ids = torch.arange(3, 40)[None]

    def logits(m):
        with torch.no_grad():
            return m.hf(input_ids=ids).logits

    with_lora = logits(model)
    with lora_disabled(model):
        without = logits(model)
    assert (with_lora - without).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(without, logits(base.eval()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model), with_lora)


def test_adapter_snapshot_swaps_in_the_start_adapter():
    layer = torch.nn.Linear(3, 2)
    snapshot = IPO.AdapterSnapshot(layer)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    moved = layer.weight.detach().clone()
    with snapshot.active():
        torch.testing.assert_close(layer.weight.detach(), start)
    torch.testing.assert_close(layer.weight.detach(), moved)


# ------------------------------------------------------------------------------------------ pair items
def test_pair_item_masks_only_the_completion_and_applies_trl_limits(tokenizer):
    pair = _pairs(2, 1)[0]
    item = IPO.pair_item(pair, tokenizer, IpoConfig(**SMALL))
    prompt = H.render_conversation(pair.prompt, tokenizer, for_training=False).ids
    chosen_len, rejected_len = item.segments
    for start, length in ((0, chosen_len), (chosen_len, rejected_len)):
        ids, mask = item.ids[start : start + length], item.loss_mask[start : start + length]
        assert ids[: len(prompt)].tolist() == prompt and not mask[: len(prompt)].any()
        assert mask[len(prompt) + len(tokenizer.encode("assistant")) + 1 :].all()  # all the model writes
        assert ids[-1] == tokenizer.call_id
    # a completion past max_length is cut at its end; a prompt past max_prompt_length drops the pair
    short = dict(SMALL, max_length=len(prompt) + 10, max_prompt_length=len(prompt))
    cut = IPO.pair_item(pair, tokenizer, IpoConfig(**short))
    assert cut.segments == (len(prompt) + 10, len(prompt) + 10)
    assert cut.ids[: len(prompt) + 10].tolist() == item.ids[: len(prompt) + 10].tolist()
    assert IPO.pair_item(pair, tokenizer, IpoConfig(**dict(SMALL, max_prompt_length=len(prompt) - 1))) is None


def test_split_pairs_keeps_a_task_on_one_side():
    pairs = _pairs(3, 40) + _pairs(3, 40)  # every task id twice
    train, held = IPO.split_pairs(pairs, 0.3)
    assert held and train
    assert not {p.task_id for p in train} & {p.task_id for p in held}


# --------------------------------------------------------------------------------------------- stage
def _fresh_run(tiny_base, name: str, adapter_scale: float) -> RunConfig:
    """A run dir with the base and a 'core_agent' adapter (random B: the policy starts away from the
    reference, so the held-out accuracy starts near chance rather than at 0 from exact ties)."""
    from rustforge.model.base import prepare_base
    from rustforge.model.lora import save_adapter

    cfg_dict, root = tiny_base
    run_dir = root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    shutil.copytree(root / "run" / "base", run_dir / "base")
    cfg = from_dict(RunConfig, {**cfg_dict, "run_dir": str(run_dir)})
    cfg.expert_monitor.every_steps = 0
    previous, _ = prepare_base(cfg, torch.device("cpu"), progress=False)
    _randomise_adapter(previous, adapter_scale)
    save_adapter(previous.hf, cfg.lora, run_dir / "core_agent" / "adapter")
    return cfg


@pytest.mark.slow
def test_ipo_raises_held_out_preference_accuracy(tiny_base):
    cfg = _fresh_run(tiny_base, "ipo", adapter_scale=0.01)
    stage = IpoConfig(
        lr=5e-3, warmup_steps=3, batch_size=1, beta=0.5, phases=[CurriculumPhase(640, 24)], max_length=320,
        max_prompt_length=240, eval_every=24, eval_batches=16, save_every=24,
    )  # fmt: skip
    result = IPO.run(cfg, stage, progress=False, train_pairs=_pairs(0, 100), val_pairs=_pairs(1000, 16))
    # measured: accuracy 0.69 -> 1.0, margin 0.02 -> 1.09 (target 1 / (2 beta) = 1), loss 0.95 -> 0.02
    assert result["accuracy_end"] >= 0.9 and result["accuracy_end"] > result["accuracy_start"], result
    assert result["margin_end"] > result["margin_start"] + 0.5
    assert result["chosen_logratio_end"] > 0 > result["rejected_logratio_end"]
    assert result["loss_end"] < result["loss_start"] / 4
    val = read_metrics(Path(cfg.run_dir) / "ipo" / "logs" / "metrics.jsonl", "val")
    assert val[0]["pairs"] == val[24]["pairs"] == 16
    assert (Path(cfg.run_dir) / "ipo" / "adapter" / "adapter_model.safetensors").is_file()


def test_ipo_resume_continues_exactly_and_reference_start_has_zero_margin(tiny_base):
    """Two steps, stop, resume for two more == four straight; with reference: start the step-0 policy is
    its own reference (log-ratios exactly 0), and after a resume still the adapter the stage began from."""
    runs = {}
    for name, calls in (("straight", [None]), ("resumed", [2, None])):
        cfg = _fresh_run(tiny_base, f"ipo-{name}", adapter_scale=0.01)
        stage = IpoConfig(
            lr=5e-3, warmup_steps=1, batch_size=1, beta=0.5, phases=[CurriculumPhase(640, 4)], max_length=320,
            max_prompt_length=240, eval_every=100, eval_batches=1, save_every=2, reference="start",
        )  # fmt: skip
        for i, stop_after in enumerate(calls):
            IPO.run(cfg, stage, resume=i > 0, progress=False, stop_after=stop_after,
                    train_pairs=_pairs(0, 6), val_pairs=_pairs(1000, 2))  # fmt: skip
        logs = Path(cfg.run_dir) / "ipo" / "logs" / "metrics.jsonl"
        runs[name] = read_metrics(logs, "train"), read_metrics(logs, "val")
    (straight, straight_val), (resumed, resumed_val) = runs["straight"], runs["resumed"]
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4]
    for key in ("loss", "margin", "chosen_logratio"):
        assert [resumed[s][key] for s in range(1, 5)] == pytest.approx([straight[s][key] for s in range(1, 5)], abs=1e-6)
    assert straight[1]["margin"] == 0.0 and straight[1]["chosen_logratio"] == 0.0
    assert straight_val[0]["margin"] == 0.0 and straight_val[4]["margin"] != 0.0
    assert resumed_val[4]["margin"] == pytest.approx(straight_val[4]["margin"], abs=1e-6)
    assert np.isfinite(straight[4]["loss"])
