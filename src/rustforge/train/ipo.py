"""Stage 3, ipo: preference tuning on executed-code pairs with IPO (Azar et al. 2023, arXiv:2310.12036).

Pairs come from rustforge.rust.trajectories (make_preference_pair: the same prompt -- an agent trajectory
up to its fixing turn -- with a `chosen` completion whose patch passes every test in the sandbox and a
`rejected` one whose patch fails one). The loss is TRL's DPOTrainer loss_type="ipo" (Eq. 17):

    logits = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))
    loss   = (logits - 1 / (2 * beta))^2

Sequence log-probs are over the completion's assistant tokens only (the assistant loss mask of
data/harmony.render_conversation, prompt tokens excluded). Like TRL, for loss_type "ipo" they are the MEAN
token log-prob (TRL's concatenated_forward divides by the completion length for ipo; the IPO paper's
target 1/(2 beta) is on that scale); for "sigmoid" (DPO) the sum. `average_logprobs` overrides this.
TRL's max_length / max_prompt_length keep their meaning, with one difference: a prompt longer than
max_prompt_length drops the pair (TRL keeps the prompt's end, which would cut the system and developer
messages off a Harmony prompt); a completion that does not fit max_length is cut at its end, as TRL does.

The reference model is the same model with its LoRA switched off (`reference: base`, TRL's choice for a
PEFT model: `disable_adapter()`), done by model/lora.lora_disabled (every LoRA scaling 0 for the
reference forward) -- no second copy of any weight. `reference: start` instead uses the adapter the stage
started from (the previous stage's), swapped in for the reference forward: a copy of the LoRA tensors only.

Chosen and rejected are packed as two documents of one item (doc ids keep them apart, positions restart),
several pairs per sequence by the same best-fit packing as the SFT stages (train/core_agent.py's
ItemDataset), so one forward scores both sides of every pair in the batch; log-probs come from
RustforgeModel.token_logprobs (the chunked path: no [tokens x vocab] logits). The loop is SFTTrainer's
(checkpoints, exact resume, curriculum, expert monitor) with its own train_step and evaluate.
Settings: IpoConfig in config.py (the run config's `ipo` section).
Metrics: loss, preference accuracy (TRL's rewards/accuracies: beta * chosen log-ratio > beta * rejected
log-ratio), margin (= logits, what IPO drives to 1/(2 beta)), chosen and rejected log-ratios.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rustforge.config import IPO_LOSS_TYPES, IpoConfig, RunConfig
from rustforge.data.harmony import Message, render_conversation
from rustforge.model.lora import lora_disabled
from rustforge.train.core_agent import ItemBatches, ItemDataset, PackItem, validation_batches
from rustforge.train.sft import SFTTrainer, StageData, finish_stage, start_stage

STAGE = "ipo"
PREVIOUS_STAGE = "core_agent"


# ---------------------------------------------------------------------------------------------- loss
def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "ipo",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses and logits ((pi_w - pi_l) - (ref_w - ref_l)) from sequence log-probs, as TRL."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2, logits
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits), logits
    raise ValueError(f"ipo.loss_type must be one of {IPO_LOSS_TYPES}, got {loss_type!r}")


@dataclass
class SideLogprobs:
    chosen: torch.Tensor  # [P] sequence log-prob of each pair's chosen completion
    rejected: torch.Tensor  # [P]
    chosen_tokens: torch.Tensor  # [P] completion tokens scored
    rejected_tokens: torch.Tensor


def pair_logprobs(model, batch: dict[str, torch.Tensor], average: bool) -> SideLogprobs:
    """Sequence log-probs of both sides of every pair in a packed batch. In each row, documents 2k and
    2k+1 are pair k's chosen and rejected (ItemDataset numbers them so); labels mark completion tokens."""
    labels, doc_ids = batch["labels"], batch["doc_ids"]
    token_lp = model.token_logprobs(batch["input_ids"], batch["position_ids"], doc_ids, labels)
    scored = (labels != -100).to(token_lp.dtype)
    docs = int(doc_ids.max()) + 1
    index = doc_ids.clamp(min=0)
    sums = token_lp.new_zeros(doc_ids.shape[0], docs).scatter_add(1, index, token_lp * scored)
    counts = token_lp.new_zeros(doc_ids.shape[0], docs).scatter_add(1, index, scored)
    pairs_in_row = (doc_ids.max(dim=1).values + 1) // 2
    present = torch.arange(docs // 2, device=doc_ids.device)[None] < pairs_in_row[:, None]
    if average:
        sums = sums / counts.clamp(min=1)
    return SideLogprobs(
        sums[:, 0::2][present], sums[:, 1::2][present], counts[:, 0::2][present], counts[:, 1::2][present]
    )


# ----------------------------------------------------------------------------------------- reference
class AdapterSnapshot:
    """The LoRA tensors as they are now; `active()` puts them into the model for the duration.

    By in-place copies (current values saved, snapshot copied in, then back), not by swapping `.data`:
    under FSDP2 each parameter is a DTensor view of FSDP's own shard storage, the tensor its all-gather
    reads, so only an in-place write reaches the forward. Costs two copies of the adapter per use."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.values = [p.detach().clone() for p in self.params]

    @contextlib.contextmanager
    def active(self):
        with torch.no_grad():
            current = [p.detach().clone() for p in self.params]
            for p, v in zip(self.params, self.values):
                p.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, current):
                    p.copy_(v)


# ---------------------------------------------------------------------------------------------- data
def _side(prompt_messages: list[Message], prompt_len: int, completion: list[Message], tokenizer, max_length: int):
    rendered = render_conversation(prompt_messages + list(completion), tokenizer, for_training=True)
    ids, mask = np.asarray(rendered.ids, dtype=np.int64), np.asarray(rendered.loss_mask, dtype=np.int8)
    mask[:prompt_len] = 0  # the prompt's own assistant messages are context here
    ids, mask = ids[:max_length], mask[:max_length]  # TRL's keep-start truncation of the completion
    return (ids, mask) if mask[1:].any() else None


def pair_item(pair, tokenizer, cfg: IpoConfig) -> PackItem | None:
    """(prompt + chosen, prompt + rejected) as one item with the completion-only loss mask; None when the
    prompt is longer than max_prompt_length or a side has no completion token left."""
    prompt_messages = list(pair.prompt.messages)
    prompt_ids = render_conversation(prompt_messages, tokenizer, for_training=False).ids
    if len(prompt_ids) > cfg.max_prompt_length:
        return None
    chosen = _side(prompt_messages, len(prompt_ids), pair.chosen, tokenizer, cfg.max_length)
    rejected = _side(prompt_messages, len(prompt_ids), pair.rejected, tokenizer, cfg.max_length)
    if chosen is None or rejected is None:
        return None
    for ids, _ in (chosen, rejected):
        if ids[: len(prompt_ids)].tolist() != prompt_ids:  # rendering is per message: a prefix, always
            raise AssertionError(f"pair {pair.task_id}: the prompt rendering is not a prefix of the pair's")
    return PackItem(
        np.concatenate([chosen[0], rejected[0]]), np.concatenate([chosen[1], rejected[1]]), (len(chosen[0]), len(rejected[0]))
    )


def split_pairs(pairs: Sequence, fraction: float) -> tuple[list, list]:
    """(train, held out) by a hash of the task id: every pair of a task lands on the same side."""
    train, held = [], []
    for pair in pairs:
        bucket = int(hashlib.sha256(str(pair.task_id).encode()).hexdigest()[:8], 16) / 16**8
        (held if bucket < fraction else train).append(pair)
    return train, held


def load_pairs(paths: Sequence[str]) -> list:
    from rustforge.rust.trajectories import read_pairs

    return [pair for path in paths for pair in read_pairs(path)]


@dataclass
class IpoData:
    stage: StageData
    counts: dict[str, int]


def stage_data(cfg: IpoConfig, tokenizer, train_pairs=None, val_pairs=None) -> IpoData:
    if train_pairs is None:
        pairs = load_pairs(cfg.pairs)
        if cfg.val_pairs:
            train_pairs, val_pairs = pairs, load_pairs(cfg.val_pairs)
        else:
            train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction)
    val_pairs = list(val_pairs or [])
    train_items = [it for it in (pair_item(p, tokenizer, cfg) for p in train_pairs) if it is not None]
    val_items = [it for it in (pair_item(p, tokenizer, cfg) for p in val_pairs) if it is not None]
    if not train_items:
        raise ValueError(f"ipo: no usable training pairs ({len(train_pairs)} read; check ipo.pairs and max_prompt_length)")
    if not val_items:
        raise ValueError("ipo: no usable held-out pairs: set ipo.val_pairs, or an ipo.val_fraction that leaves some")
    pad = tokenizer.pad_id

    def train(phase: int, seq_len: int):
        return ItemBatches(ItemDataset(train_items, seq_len, cfg.batch_size, pad, seed=cfg.seed + phase), cfg.batch_size)

    def validation(seq_len: int):
        return validation_batches(val_items, seq_len, cfg.batch_size, cfg.eval_batches, pad, cfg.seed)

    counts = {
        "train_pairs": len(train_items),
        "val_pairs": len(val_items),
        "dropped_pairs": len(train_pairs) + len(val_pairs) - len(train_items) - len(val_items),
    }
    return IpoData(StageData(train=train, validation=validation), counts)


# ------------------------------------------------------------------------------------------ trainer
class IpoTrainer(SFTTrainer):
    """SFTTrainer's loop (checkpoints, resume, curriculum, expert monitor) with the IPO objective."""

    stage_name = "ipo"
    graphable = False  # its own train_step (not SFT's)

    def __init__(self, *args, ipo_cfg: IpoConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.ipo = ipo_cfg
        # taken now, before a resume loads a checkpoint: the adapter the stage started from
        self.start_adapter = AdapterSnapshot(self.model) if ipo_cfg.reference == "start" else None

    def reference(self):
        return self.start_adapter.active() if self.start_adapter else lora_disabled(self.model)

    def _reference_logprobs(self, batch) -> SideLogprobs:
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout in the reference
        try:
            with torch.no_grad(), self.reference(), self._autocast():
                return pair_logprobs(self.model, batch, self.ipo.averages)
        finally:
            self.model.train(was_training)

    def _preference_loss(self, policy: SideLogprobs, reference: SideLogprobs):
        return preference_loss(
            policy.chosen, policy.rejected, reference.chosen, reference.rejected, self.ipo.beta, self.ipo.loss_type
        )

    def train_step(self) -> dict[str, float]:
        t0, lr, batches = self.begin_step()
        n_pairs = sum(_pairs_in(b) for b in self.step_batches)  # over the global step: every rank's slice
        pieces = len(batches) * self.dist.world_size  # micro-batches (or row slices of them) in the global step
        totals = _Totals()
        for batch in batches:
            reference = self._reference_logprobs(batch)
            with self._autocast():
                policy = pair_logprobs(self.model, batch, self.ipo.averages)
            if self.monitor:
                self.monitor.update(self.model.router_logits, batch["doc_ids"] >= 0)
            aux = self.model.aux_loss(batch["doc_ids"])
            losses, logits = self._preference_loss(policy, reference)
            loss = losses.sum() / max(n_pairs, 1) + self.model.config.router_aux_loss_coef * aux / pieces
            if self.dist.enabled:
                loss = loss * self.dist.world_size  # FSDP averages gradients over ranks; we want their sum
            loss.backward()
            totals.add(losses, logits, policy, reference, self.ipo.beta)
            totals.aux += float(aux.detach()) / pieces
        totals.all_reduce(self.dist)
        return self.finish_step(batches, t0, lr, {**totals.metrics(), "aux_loss": totals.aux})

    @torch.no_grad()
    def evaluate(self, logger=None) -> dict[str, float]:
        self.model.eval()
        seq_len = self.cfg.eval_seq_len or self.cfg.phases[0].seq_len
        if seq_len not in self.val_cache:
            self.val_cache[seq_len] = self.data.validation(seq_len)
        batches = self.val_cache[seq_len]
        totals = _Totals()
        for i, counts in self.dist.padded_share(len(batches)):  # all of them at world size 1
            batch = self._to_device(batches[i])
            reference = self._reference_logprobs(batch)
            with self._autocast():
                policy = pair_logprobs(self.model, batch, self.ipo.averages)
            if counts:  # the padding forward only keeps FSDP's collectives in step
                totals.add(*self._preference_loss(policy, reference), policy, reference, self.ipo.beta)
        totals.all_reduce(self.dist)
        metrics = totals.metrics() if totals.pairs else {}
        if logger is not None and metrics:
            logger.log(self.step, metrics, split="val")
        return metrics


def _pairs_in(batch) -> int:
    """Pairs in a packed batch: each row holds documents 0 .. 2k-1, two per pair."""
    return int(((batch["doc_ids"].max(dim=1).values + 1) // 2).sum())


class _Totals:
    """Sums over pairs of the loss and the preference metrics."""

    def __init__(self):
        self.pairs, self.aux = 0, 0.0
        self.sums = dict.fromkeys(("loss", "accuracy", "margin", "chosen_logratio", "rejected_logratio"), 0.0)

    def add(self, losses, logits, policy: SideLogprobs, reference: SideLogprobs, beta: float) -> None:
        chosen_ratio = (policy.chosen - reference.chosen).detach()
        rejected_ratio = (policy.rejected - reference.rejected).detach()
        self.pairs += len(losses)
        self.sums["loss"] += float(losses.detach().sum())
        self.sums["accuracy"] += float((beta * chosen_ratio > beta * rejected_ratio).float().sum())
        self.sums["margin"] += float(logits.detach().sum())
        self.sums["chosen_logratio"] += float(chosen_ratio.sum())
        self.sums["rejected_logratio"] += float(rejected_ratio.sum())

    def all_reduce(self, dist) -> None:
        """Sums over every rank (a no-op at world size 1)."""
        keys = list(self.sums)
        values = dist.all_reduce_sum([self.sums[k] for k in keys] + [self.pairs, self.aux])
        self.sums = dict(zip(keys, values[: len(keys)]))
        self.pairs, self.aux = int(values[-2]), values[-1]

    def metrics(self) -> dict[str, float]:
        out = {k: v / max(self.pairs, 1) for k, v in self.sums.items()}
        out["pairs"] = self.pairs
        return out


# ---------------------------------------------------------------------------------------------- run
def run(
    cfg: RunConfig,
    stage_cfg: IpoConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    train_pairs: Sequence | None = None,
    val_pairs: Sequence | None = None,
) -> dict:
    """Train the stage (cfg.ipo unless stage_cfg is given) from the core_agent adapter; pairs given directly
    replace the configured files. Returns `summary`."""
    stage_cfg = stage_cfg or cfg.ipo
    if train_pairs is None and not stage_cfg.pairs:  # the run's own data (rustforge pipeline builds it)
        from rustforge.train.agent_data import run_files

        train, val = run_files(cfg.run_dir, "pairs")
        stage_cfg = replace(stage_cfg, pairs=train, val_pairs=stage_cfg.val_pairs or val)
    start = start_stage(cfg, STAGE, stage_cfg.init_from, PREVIOUS_STAGE, progress)
    data = stage_data(stage_cfg, start.tokenizer, train_pairs, val_pairs)
    trainer = IpoTrainer(
        start.model, cfg.lora, stage_cfg, data.stage, start.stage_dir, start.device, progress, cfg.expert_monitor,
        ipo_cfg=stage_cfg,
    )  # fmt: skip
    finish_stage(trainer, resume, stop_after)
    return summary(start.stage_dir)


SUMMARY_KEYS = ("loss", "accuracy", "margin", "chosen_logratio", "rejected_logratio")


def summary(stage_dir: Path) -> dict:
    """Held-out preference metrics before (step 0) and after."""
    from rustforge.train.metrics import before_after

    return before_after(stage_dir, SUMMARY_KEYS, "held-out pairs")


__all__ = [
    "AdapterSnapshot",
    "IpoTrainer",
    "SideLogprobs",
    "pair_item",
    "pair_logprobs",
    "preference_loss",
    "run",
    "split_pairs",
    "stage_data",
    "summary",
]
