"""Stage 2, core_agent: SFT on Harmony agent trajectories, the loss on the assistant's tokens only.

Data flow: trajectories (rustforge.rust.trajectories: synthesised from mined tasks with real tool outputs,
JSONL of {"messages": [...]}) and optional user chats in OpenAI format -> Harmony renderings with the
assistant loss mask (data/harmony.render_conversation; `train_channels` picks the channels, default all)
-> conversations packed whole into the phase's seq_len by the same best-fit-decreasing packing as
lang_rust (data/packing.py: each conversation is a document with its own positions and doc id, so
packed conversations never see each other) -> SFTTrainer (train/sft.py) with its checkpoints and resume.

Labels: position t predicts token t+1 of the same conversation only when token t+1 is one the assistant
writes (loss_mask[t+1] = 1); every other label is -100. A conversation longer than seq_len is never
split mid-message: with long_conversations = "truncate" (default) it keeps its longest prefix of whole
messages that fits (dropped if that prefix has no assistant token); with "drop" it is left out.

Validation: held-out token loss as lang_rust, plus format metrics from SAMPLING the model on held-out
prompts (each assistant turn's prompt of the held-out conversations; eval/sampling.py): Harmony
compliance rate, valid tool-call rate, endless-reasoning rate -- at step 0 and at every evaluation.

Settings: CoreAgentConfig in config.py (the run config's `core_agent` section); with no trajectories
configured the stage reads the run's own, built by `rustforge pipeline` (train/agent_data.py).

The packing of items made of several documents (`PackItem`, `ItemDataset`) is shared with the ipo
stage, whose items are (prompt + chosen, prompt + rejected).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rustforge.config import CoreAgentConfig, PackingConfig, RunConfig
from rustforge.data.harmony import (
    Conversation,
    DeveloperContent,
    Message,
    render_conversation,
    render_prompt,
)
from rustforge.data.packing import (
    IGNORE_INDEX,
    PackedDataset,
    PackedSequence,
    PackResult,
    collate,
)
from rustforge.train import distributed
from rustforge.train.sft import BatchSource, DatasetBatches, SFTTrainer, StageData, finish_stage, start_stage

log = logging.getLogger(__name__)

STAGE = "core_agent"
PREVIOUS_STAGE = "lang_rust"


# ------------------------------------------------------------------------------- packing of items
@dataclass
class PackItem:
    """What packing places as one unit: one or more documents back to back (core_agent: a conversation;
    ipo: prompt + chosen and prompt + rejected), never split across sequences."""

    ids: np.ndarray  # int64, all documents concatenated
    loss_mask: np.ndarray  # int8, 1 = a token the model is trained to write
    segments: tuple[int, ...]  # lengths of the documents (sum = len(ids)); each gets its own doc id

    def __post_init__(self):
        if sum(self.segments) != len(self.ids) or len(self.loss_mask) != len(self.ids) or min(self.segments) < 1:
            raise ValueError(f"PackItem: segments {self.segments} do not cover {len(self.ids)} tokens")

    def __len__(self) -> int:
        return len(self.ids)


def item_sequence(items: Sequence[PackItem], indices: Sequence[int]) -> PackedSequence:
    """Items placed back to back: positions restart and the doc id advances at every document; the label
    at t is token t+1 of the same document where that token is trained, else IGNORE_INDEX."""
    ids, positions, doc_ids, labels = [], [], [], []
    doc = 0
    for index in indices:
        item = items[index]
        start = 0
        for length in item.segments:
            seg_ids = item.ids[start : start + length]
            seg_labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
            trained_next = item.loss_mask[start + 1 : start + length].astype(bool)
            seg_labels[:-1][trained_next] = seg_ids[1:][trained_next]
            ids.append(seg_ids)
            positions.append(np.arange(length, dtype=np.int64))
            doc_ids.append(np.full(length, doc, dtype=np.int64))
            labels.append(seg_labels)
            start += length
            doc += 1
    cat = np.concatenate
    return PackedSequence(cat(ids).astype(np.int64), cat(positions), cat(doc_ids), cat(labels))


def item_label_count(item: PackItem) -> int:
    """Labels an item gets: trained tokens that are not the first of their document."""
    starts = np.cumsum((0,) + item.segments[:-1])
    return int(item.loss_mask.sum()) - int(item.loss_mask[starts].sum())


class ItemPack(PackResult):
    """A PackResult over whole items whose sequences carry the items' documents and loss masks."""

    def __init__(self, items: Sequence[PackItem], packed: PackResult):
        super().__init__(packed.docs, packed.layout, packed.stats)
        self.items = items
        self.stats.loss_tokens = sum(item_label_count(it) for it in items)
        self.stats.docs = sum(len(it.segments) for it in items)

    def sequence(self, index: int) -> PackedSequence:
        return item_sequence(self.items, [piece.doc for piece in self.layout[index]])


class ItemDataset(PackedDataset):
    """PackedDataset (seeded epoch order, exact-resume cursor) over items that each fit in seq_len."""

    def __init__(self, items: Sequence[PackItem], seq_len: int, batch_size: int = 1, pad_id: int = 0, seed: int = 0):
        check_items_fit(items, seq_len)
        whole = PackingConfig(long_docs="truncate", min_piece_tokens=0)  # nothing is cut: every item fits
        super().__init__([it.ids for it in items], seq_len, whole, batch_size, pad_id, seed)
        self.pack = ItemPack(items, self.pack)


def check_items_fit(items: Sequence[PackItem], seq_len: int) -> None:
    if not items:
        raise ValueError("no items to pack (every conversation was dropped or none was given)")
    longest = max(len(it) for it in items)
    if longest > seq_len:
        raise ValueError(f"an item of {longest} tokens does not fit seq_len={seq_len}")


def pack_items(items: Sequence[PackItem], seq_len: int, seed: int = 0) -> ItemPack:
    """Best-fit-decreasing packing of whole items (data/packing.py), sequences built by item_sequence."""
    from rustforge.data.packing import pack_documents

    check_items_fit(items, seq_len)
    packed = pack_documents([it.ids for it in items], seq_len, PackingConfig(long_docs="truncate", min_piece_tokens=0), seed)
    return ItemPack(items, packed)


def validation_batches(items: Sequence[PackItem], seq_len: int, batch_size: int, max_batches: int, pad_id: int, seed: int):
    """The first max_batches collated batches of the packed items: a fixed validation set."""
    packed = pack_items(items, seq_len, seed)
    n = min(max_batches * batch_size, len(packed))
    seqs = [packed.sequence(i) for i in range(n)]
    return [collate(seqs[i : i + batch_size], seq_len, pad_id) for i in range(0, n, batch_size)]


ItemBatches = DatasetBatches  # an ItemDataset serves batches like a PackedDataset


# ----------------------------------------------------------------------------------- conversations
def conversation_item(conv: Conversation, tokenizer, train_channels: Sequence[str] | None = None) -> PackItem:
    rendered = render_conversation(conv, tokenizer, for_training=True, train_channels=train_channels)
    ids = np.asarray(rendered.ids, dtype=np.int64)
    return PackItem(ids, np.asarray(rendered.loss_mask, dtype=np.int8), (len(ids),))


def fit_conversation(item: PackItem, seq_len: int, mode: str, start_id: int) -> PackItem | None:
    """The item if it fits; else (truncate) its longest prefix of whole messages that fits and still has
    an assistant token to learn, or None (drop, or nothing left)."""
    if len(item) <= seq_len:
        return item
    if mode == "drop":
        return None
    # every message starts with <|start|> and content never holds a special token: these are boundaries
    starts = np.flatnonzero(item.ids[: seq_len + 1] == start_id)
    cut = int(starts[-1]) if len(starts) else 0
    if cut < 2 or not item.loss_mask[1:cut].any():
        return None
    return PackItem(item.ids[:cut], item.loss_mask[:cut], (cut,))


def fit_conversations(items: Sequence[PackItem], seq_len: int, mode: str, start_id: int) -> tuple[list[PackItem], dict]:
    kept, truncated, dropped = [], 0, 0
    for item in items:
        fitted = fit_conversation(item, seq_len, mode, start_id)
        if fitted is None:
            dropped += 1
        else:
            truncated += fitted is not item
            kept.append(fitted)
    return kept, {"conversations": len(items), "truncated": truncated, "dropped": dropped}


def tool_names(conv: Conversation | Sequence[Message]) -> list[str]:
    """Names of the function tools the conversation's developer message defines."""
    messages = conv.messages if isinstance(conv, Conversation) else conv
    return [
        tool.name
        for m in messages
        if isinstance(m.content, DeveloperContent)
        for ns in m.content.tools or []
        if ns.name == "functions"
        for tool in ns.tools
    ]


@dataclass
class EvalPrompt:
    ids: list[int]  # ends with <|start|>assistant
    tool_names: list[str]


def turn_prompts(conv: Conversation) -> list[list[Message]]:
    """The prompt of each assistant turn: the messages before an assistant message that follows a user,
    tool, system or developer message."""
    messages = conv.messages
    return [
        messages[:i]
        for i, m in enumerate(messages)
        if m.role == "assistant" and i > 0 and messages[i - 1].role != "assistant"
    ]


def eval_prompts(
    convs: Sequence[Conversation], tokenizer, count: int, max_tokens: int | None = None
) -> list[EvalPrompt]:
    """Up to `count` held-out turn prompts of at most max_tokens, spread over the conversations: every
    first turn, then every second turn, ... (deterministic)."""
    per_conv = [(turn_prompts(c), tool_names(c)) for c in convs]
    out: list[EvalPrompt] = []
    depth = 0
    while len(out) < count and any(depth < len(turns) for turns, _ in per_conv):
        for turns, names in per_conv:
            if depth < len(turns) and len(out) < count:
                ids = render_prompt(turns[depth], tokenizer)
                if max_tokens is None or len(ids) <= max_tokens:
                    out.append(EvalPrompt(ids, names))
        depth += 1
    return out


def _conversation_key(conv: Conversation) -> str:
    from rustforge.rust.trajectories import message_to_dict

    text = json.dumps([message_to_dict(m) for m in conv.messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def split_held_out(convs: Sequence[Conversation], fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held out) by a hash of each conversation's content: stable under reordering and appends."""
    train, held = [], []
    for conv in convs:
        bucket = int(_conversation_key(conv)[:8], 16) / 16**8
        (held if bucket < fraction else train).append(conv)
    return train, held


def load_conversations(paths: Sequence[str], openai_paths: Sequence[str], tokenizer) -> list[Conversation]:
    """Trajectories (rust/trajectories.py JSONL) and OpenAI-format chats, each checked: a conversation
    whose assistant turns are not valid Harmony is an error naming its file and number."""
    from rustforge.rust.trajectories import (
        TrajectoryError,
        load_openai_jsonl,
        read_trajectories,
        validate_conversation,
    )

    convs: list[Conversation] = []
    for path in paths:
        for number, conv in enumerate(read_trajectories(path), 1):
            problems = validate_conversation(conv, tokenizer, tool_names(conv) or None)
            if problems:
                raise TrajectoryError(f"{path}: conversation {number}: {'; '.join(problems)}")
            convs.append(conv)
    for path in openai_paths:
        convs += load_openai_jsonl(path, tokenizer)  # validates, errors name file:line
    return convs


# -------------------------------------------------------------------------------------- stage data
@dataclass
class CoreAgentData:
    stage: StageData
    prompts: list[EvalPrompt]
    counts: dict[str, int]


def stage_conversations(stage_cfg: CoreAgentConfig, tokenizer) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held out) conversations of the config's files: val_trajectories, else val_fraction held out."""
    convs = load_conversations(stage_cfg.trajectories, stage_cfg.openai_jsonl, tokenizer)
    if stage_cfg.val_trajectories:
        return convs, load_conversations(stage_cfg.val_trajectories, [], tokenizer)
    return split_held_out(convs, stage_cfg.val_fraction)


def with_run_trajectories(cfg: RunConfig, stage_cfg: CoreAgentConfig) -> CoreAgentConfig:
    """stage_cfg, reading the run's own trajectories (train/agent_data.py) when it names none."""
    if stage_cfg.trajectories:
        return stage_cfg
    from rustforge.train.agent_data import run_files

    train, val = run_files(cfg.run_dir, "trajectories")
    return replace(stage_cfg, trajectories=train, val_trajectories=stage_cfg.val_trajectories or val)


def stage_data(stage_cfg: CoreAgentConfig, tokenizer, train_convs=None, val_convs=None) -> CoreAgentData:
    """Batches for each curriculum phase, the fixed validation batches and the held-out sampling prompts.
    train_convs / val_convs: conversations given directly (else read from the config's files)."""
    if train_convs is None:
        train_convs, val_convs = stage_conversations(stage_cfg, tokenizer)
    val_convs = list(val_convs or [])
    if not train_convs:
        raise ValueError("core_agent: no training conversations (check core_agent.trajectories)")
    if not val_convs:
        raise ValueError(
            "core_agent: no held-out conversations for validation: set core_agent.val_trajectories, "
            "or a core_agent.val_fraction that leaves some"
        )
    channels = stage_cfg.train_channels
    train_items = [conversation_item(c, tokenizer, channels) for c in train_convs]
    val_items = [conversation_item(c, tokenizer, channels) for c in val_convs]
    mode, start_id, pad = stage_cfg.long_conversations, tokenizer.start_id, tokenizer.pad_id

    def train(phase: int, seq_len: int) -> BatchSource:
        items, counts = fit_conversations(train_items, seq_len, mode, start_id)
        if counts["truncated"] or counts["dropped"]:
            log.warning("core_agent phase %d (seq_len %d): %s", phase, seq_len, counts)
        dataset = ItemDataset(items, seq_len, stage_cfg.batch_size, pad, seed=stage_cfg.seed + phase)
        return ItemBatches(dataset, stage_cfg.batch_size)

    def validation(seq_len: int):
        items, _ = fit_conversations(val_items, seq_len, mode, start_id)
        if not items:
            return []
        return validation_batches(items, seq_len, stage_cfg.batch_size, stage_cfg.eval_batches, pad, stage_cfg.seed)

    prompts = eval_prompts(val_convs, tokenizer, stage_cfg.sample_prompts, stage_cfg.sample_max_prompt_tokens)
    counts = {"train_conversations": len(train_convs), "val_conversations": len(val_convs), "eval_prompts": len(prompts)}
    return CoreAgentData(StageData(train=train, validation=validation), prompts, counts)


# ------------------------------------------------------------------------------------------ trainer
class CoreAgentTrainer(SFTTrainer):
    """SFTTrainer whose evaluation adds the format metrics of completions sampled on held-out prompts."""

    stage_name = "core_agent"

    def __init__(self, *args, tokenizer, prompts: Sequence[EvalPrompt], stage_cfg: CoreAgentConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer, self.prompts, self.stage_cfg = tokenizer, list(prompts), stage_cfg

    def evaluate(self, logger=None) -> dict[str, float]:
        metrics = super().evaluate(None) if self._has_validation() else {}
        if self.prompts:
            metrics.update(self.sample_metrics())
        if logger is not None and metrics:
            logger.log(self.step, metrics, split="val")
        return metrics

    def _has_validation(self) -> bool:
        seq_len = self.cfg.eval_seq_len or self.cfg.phases[0].seq_len
        if seq_len not in self.val_cache:
            self.val_cache[seq_len] = self.data.validation(seq_len)
        return bool(self.val_cache[seq_len])

    def sample_metrics(self) -> dict[str, float]:
        from rustforge.eval.sampling import format_metrics

        names = [p.tool_names or None for p in self.prompts]
        s = self.stage_cfg
        return format_metrics(self.sample_prompts(), self.tokenizer, names, s.reasoning_token_budget)

    def sample_prompts(self):
        """One completion per held-out prompt, in their order. Under FSDP every rank gathers the full
        weights (the engine reads parameters directly), samples its own block of the prompts with their
        global indices as sampling streams (the single-process tokens), and the blocks are exchanged."""
        from rustforge.eval.sampling import sample_completions

        s = self.stage_cfg
        mine = self.dist.share(len(self.prompts))
        samples = []
        with distributed.full_weights(self.model), self._autocast():
            if len(mine):
                samples = sample_completions(
                    self.model, [self.prompts[i].ids for i in mine], self.tokenizer, s.sample_max_new_tokens,
                    s.sample_temperature, s.sample_top_p, seed=s.seed, batch_size=s.sample_batch_size,
                    streams=list(mine),
                )  # fmt: skip
        return self.dist.gather_lists(samples)


# ---------------------------------------------------------------------------------------------- run
def run(
    cfg: RunConfig,
    stage_cfg: CoreAgentConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    train_convs: Sequence[Conversation] | None = None,
    val_convs: Sequence[Conversation] | None = None,
) -> dict:
    """Train the stage (cfg.core_agent unless stage_cfg is given) from the lang_rust adapter; conversations
    given directly replace the configured files. Returns `summary`."""
    stage_cfg = stage_cfg or cfg.core_agent
    if train_convs is None:  # the run's own data when none is configured (rustforge pipeline builds it)
        stage_cfg = with_run_trajectories(cfg, stage_cfg)
    start = start_stage(cfg, STAGE, stage_cfg.init_from, PREVIOUS_STAGE, progress)
    data = stage_data(stage_cfg, start.tokenizer, train_convs, val_convs)
    trainer = CoreAgentTrainer(
        start.model, cfg.lora, stage_cfg, data.stage, start.stage_dir, start.device, progress, cfg.expert_monitor,
        tokenizer=start.tokenizer, prompts=data.prompts, stage_cfg=stage_cfg,
    )  # fmt: skip
    finish_stage(trainer, resume, stop_after)
    return summary(start.stage_dir)


FORMAT_KEYS = ("harmony_compliance", "valid_tool_call_rate", "endless_reasoning_rate")


def summary(stage_dir: Path) -> dict:
    """Before and after: held-out loss and the format metrics of sampled held-out completions."""
    from rustforge.train.metrics import read_metrics

    val = read_metrics(Path(stage_dir) / "logs" / "metrics.jsonl", "val")
    if not val:
        raise ValueError(f"{stage_dir}: no validation metrics logged")
    first, last = val[min(val)], val[max(val)]
    out: dict = {"steps": max(val)}
    for key in ("loss",) + FORMAT_KEYS:
        if key in first:
            out[f"{key}_start"], out[f"{key}_end"] = first[key], last.get(key, math.nan)
    if "loss" in first:
        out["val_loss_start"], out["val_loss_end"] = first["loss"], last["loss"]
        out["val_ppl_start"], out["val_ppl_end"] = math.exp(min(first["loss"], 50)), math.exp(min(last["loss"], 50))
    return out


__all__ = [
    "CoreAgentTrainer",
    "EvalPrompt",
    "ItemBatches",
    "ItemDataset",
    "ItemPack",
    "PackItem",
    "conversation_item",
    "eval_prompts",
    "fit_conversation",
    "item_sequence",
    "load_conversations",
    "pack_items",
    "run",
    "split_held_out",
    "stage_conversations",
    "stage_data",
    "summary",
    "tool_names",
    "turn_prompts",
    "with_run_trajectories",
]
