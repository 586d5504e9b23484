"""Padding-free, uncontaminated sequence packing of tokenised documents.

Documents (token lists, each ending with the EOS the caller appended) are placed into sequences of at
most `seq_len` tokens by best-fit-decreasing bin packing. Inside a sequence every document keeps its own
identity: `position_ids` restart at 0, `doc_ids` number the documents 0, 1, 2, ... (for a block-diagonal
attention mask) and `labels` never point across a document boundary (-100 at each document's last token),
so packing changes neither what a token can attend to nor what it is asked to predict.

Documents longer than `seq_len` are either truncated or split into pieces of `seq_len` tokens that
overlap by `split_overlap` tokens. The overlap is context only: its labels are -100 in the later piece,
because the earlier piece already predicted those tokens (with more context), so every token of a split
document is a target exactly once.

`PackedDataset` serves collated batches in a seeded per-epoch order with a resumable (epoch, position).

Own code: the packing is ~40 lines (sorted capacities + bisect) and the label/position rules are ours;
no library does both with an exact-resume cursor.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from rustforge.config import PackingConfig

IGNORE_INDEX = -100
LONG_DOC_MODES = ("split", "truncate")


class Piece(NamedTuple):
    doc: int  # index into the document list
    start: int  # token range [start, end) of that document
    end: int
    context: int  # leading tokens that are context only (the overlap with the previous piece)

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class PackedSequence:
    input_ids: np.ndarray  # int64 [L], L <= seq_len
    position_ids: np.ndarray  # restarts at 0 at every document
    doc_ids: np.ndarray  # 0, 1, 2, ... per document within this sequence
    labels: np.ndarray  # next token of the same document; IGNORE_INDEX at each document's last token

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackStats:
    seq_len: int
    docs: int = 0
    empty_docs: int = 0  # zero-token documents, skipped
    long_docs: int = 0  # documents longer than seq_len (split or truncated)
    pieces: int = 0  # pieces placed in sequences (a short document is one piece)
    dropped_pieces: int = 0  # split pieces shorter than min_piece_tokens
    real_tokens: int = 0  # tokens placed in sequences (overlap tokens counted in each piece)
    overlap_tokens: int = 0  # of real_tokens, those repeated as context of a split piece
    truncated_tokens: int = 0  # input tokens in no sequence: cut by "truncate" or in dropped pieces
    loss_tokens: int = 0  # labels != IGNORE_INDEX
    sequences: int = 0

    @property
    def slots(self) -> int:
        return self.sequences * self.seq_len

    @property
    def efficiency(self) -> float:
        """Real tokens / slots: the fraction of a padded batch that is not padding."""
        return self.real_tokens / self.slots if self.slots else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "slots": self.slots, "efficiency": self.efficiency}


# ------------------------------------------------------------------------------------------- pieces
def _check_config(seq_len: int, cfg: PackingConfig) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if cfg.long_docs not in LONG_DOC_MODES:
        raise ValueError(f"packing.long_docs: must be one of {LONG_DOC_MODES}, got {cfg.long_docs!r}")
    if cfg.long_docs == "split" and not 0 <= cfg.split_overlap < seq_len:
        raise ValueError(f"packing.split_overlap: must be in [0, seq_len={seq_len}), got {cfg.split_overlap}")
    if not 0 <= cfg.min_piece_tokens <= seq_len:
        raise ValueError(f"packing.min_piece_tokens: must be in [0, seq_len={seq_len}], got {cfg.min_piece_tokens}")


def make_pieces(lengths: Sequence[int], seq_len: int, cfg: PackingConfig, stats: PackStats) -> list[Piece]:
    """Cut documents into pieces of at most seq_len tokens (see the module docstring); fills `stats`."""
    _check_config(seq_len, cfg)
    stride = seq_len - cfg.split_overlap
    pieces = []
    for doc, n in enumerate(lengths):
        stats.docs += 1
        if n == 0:
            stats.empty_docs += 1
        elif n <= seq_len:
            pieces.append(Piece(doc, 0, n, 0))
        elif cfg.long_docs == "truncate":
            stats.long_docs += 1
            stats.truncated_tokens += n - seq_len
            pieces.append(Piece(doc, 0, seq_len, 0))
        else:
            stats.long_docs += 1
            for start in range(0, n, stride):
                end = min(start + seq_len, n)
                context = cfg.split_overlap if start else 0
                if end - start < cfg.min_piece_tokens:
                    stats.dropped_pieces += 1
                    stats.truncated_tokens += end - start - context
                else:
                    pieces.append(Piece(doc, start, end, context))
                    stats.overlap_tokens += context
                if end == n:
                    break
    stats.pieces = len(pieces)
    stats.real_tokens = sum(p.length for p in pieces)
    stats.loss_tokens = sum(p.length - max(p.context, 1) for p in pieces)
    return pieces


# -------------------------------------------------------------------------------------- bin packing
def best_fit_decreasing(sizes: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Indices of `sizes` grouped into bins of total <= capacity, largest item first into the fullest bin
    that still fits it. Open bins are bucketed by remaining capacity; a sorted list of the non-empty
    remaining capacities + bisect finds the best fit in O(log capacity). Ties in size are broken by a
    seeded shuffle, so the result is deterministic for a seed.
    """
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    if len(sizes_arr) and (sizes_arr.max() > capacity or sizes_arr.min() < 1):
        raise ValueError(f"item sizes must be in [1, {capacity}], got [{sizes_arr.min()}, {sizes_arr.max()}]")
    shuffled = np.random.default_rng(seed).permutation(len(sizes_arr))
    order = shuffled[np.argsort(-sizes_arr[shuffled], kind="stable")]
    bins: list[list[int]] = []
    open_capacities: list[int] = []  # sorted distinct remaining capacities of open bins
    bins_by_capacity: dict[int, list[int]] = {}
    for item in order.tolist():
        size = int(sizes_arr[item])
        k = bisect.bisect_left(open_capacities, size)
        if k == len(open_capacities):
            b, remaining = len(bins), capacity - size
            bins.append([])
        else:
            fitting = open_capacities[k]
            same = bins_by_capacity[fitting]
            b, remaining = same.pop(), fitting - size
            if not same:
                del bins_by_capacity[fitting]
                open_capacities.pop(k)
        bins[b].append(item)
        if remaining > 0:
            if remaining not in bins_by_capacity:
                bisect.insort(open_capacities, remaining)
                bins_by_capacity[remaining] = []
            bins_by_capacity[remaining].append(b)
    return bins


# -------------------------------------------------------------------------------------- sequences
def build_sequence(docs: Sequence[Sequence[int]], pieces: Sequence[Piece]) -> PackedSequence:
    """The packed arrays for `pieces` placed one after another."""
    input_ids = np.concatenate([np.asarray(docs[p.doc][p.start : p.end], dtype=np.int64) for p in pieces])
    lengths = np.array([p.length for p in pieces], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    doc_ids = np.repeat(np.arange(len(pieces), dtype=np.int64), lengths)
    position_ids = np.arange(len(input_ids), dtype=np.int64) - np.repeat(offsets, lengths)
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    for offset, piece in zip(offsets.tolist(), pieces):
        first = offset + max(piece.context - 1, 0)  # overlap targets were predicted by the previous piece
        last = offset + piece.length - 1  # the document's last token predicts nothing
        labels[first:last] = input_ids[first + 1 : last + 1]
    return PackedSequence(input_ids, position_ids, doc_ids, labels)


class PackResult:
    """Packed layout of a document list; sequences are built on first access (memory ~ one copy)."""

    def __init__(self, docs: Sequence[Sequence[int]], layout: list[list[Piece]], stats: PackStats):
        self.docs = docs
        self.layout = layout
        self.stats = stats
        self._sequences: list[PackedSequence] | None = None

    def __len__(self) -> int:
        return len(self.layout)

    def sequence(self, index: int) -> PackedSequence:
        return build_sequence(self.docs, self.layout[index])

    @property
    def sequences(self) -> list[PackedSequence]:
        if self._sequences is None:
            self._sequences = [self.sequence(i) for i in range(len(self))]
        return self._sequences


def pack_documents(
    docs: Sequence[Sequence[int]], seq_len: int, cfg: PackingConfig, seed: int = 0
) -> PackResult:
    """Best-fit-decreasing packing of `docs` (token sequences, any indexable of ints) into seq_len bins."""
    stats = PackStats(seq_len=seq_len)
    pieces = make_pieces([len(d) for d in docs], seq_len, cfg, stats)
    bins = best_fit_decreasing([p.length for p in pieces], seq_len, seed)
    stats.sequences = len(bins)
    return PackResult(docs, [[pieces[i] for i in b] for b in bins], stats)


def collate(seqs: Sequence[PackedSequence], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to [B, seq_len]: input_ids pad_id, position_ids 0, doc_ids -1, labels IGNORE_INDEX."""
    fills = {"input_ids": pad_id, "position_ids": 0, "doc_ids": -1, "labels": IGNORE_INDEX}
    batch = {k: np.full((len(seqs), seq_len), v, dtype=np.int64) for k, v in fills.items()}
    for row, seq in enumerate(seqs):
        if len(seq) > seq_len:
            raise ValueError(f"sequence {row} has {len(seq)} tokens, more than seq_len={seq_len}")
        for key in fills:
            batch[key][row, : len(seq)] = getattr(seq, key)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ dataset
class PackedDataset:
    """Infinite iterator of collated batches over epochs, each epoch in a seeded shuffled order.

    The cursor is (epoch, position): position is the next sequence of the epoch's order. A batch that
    would run past the end of the epoch starts the next epoch instead (the < batch_size leftover is
    skipped; every epoch reshuffles, so it is a different leftover each time). After
    `load_state_dict(state_dict())` the following batches are exactly those the saved run would have
    drawn, given the same batch sizes. A new seq_len (curriculum phase) means a new PackedDataset.
    """

    def __init__(
        self,
        docs: Sequence[Sequence[int]],
        seq_len: int,
        cfg: PackingConfig | None = None,
        batch_size: int = 1,
        pad_id: int = 0,
        seed: int = 0,
    ):
        self.pack = pack_documents(docs, seq_len, cfg or PackingConfig(), seed)
        if len(self.pack) == 0:
            raise ValueError("PackedDataset: no tokens to pack (every document is empty)")
        self.seq_len, self.pad_id, self.seed = seq_len, pad_id, seed
        self.batch_size = self._check_batch_size(batch_size)
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None

    def _check_batch_size(self, batch_size: int) -> int:
        if not 1 <= batch_size <= len(self.pack):
            raise ValueError(
                f"batch_size={batch_size}: must be in [1, {len(self.pack)}] "
                f"(the number of packed sequences of {self.seq_len} tokens)"
            )
        return batch_size

    @property
    def stats(self) -> PackStats:
        return self.pack.stats

    def __len__(self) -> int:
        """Batches of `batch_size` per epoch."""
        return len(self.pack) // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng((self.seed, epoch))  # (seed, epoch): no collision of seed+epoch sums
            self._order = (epoch, rng.permutation(len(self.pack)))
        return self._order[1]

    def next_batch(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """The next `batch_size` (default: the constructor's) sequences, collated to [B, seq_len]."""
        n = self._check_batch_size(batch_size or self.batch_size)
        if self.position + n > len(self.pack):
            self.epoch, self.position = self.epoch + 1, 0
        rows = self.epoch_order(self.epoch)[self.position : self.position + n]
        self.position += n
        return collate([self.pack.sequence(int(i)) for i in rows], self.seq_len, self.pad_id)

    def __iter__(self) -> PackedDataset:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_sequences": len(self.pack),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`'s cursor; refuses a state saved for a differently packed dataset."""
        for key in ("seed", "seq_len", "num_sequences"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"data state: {key}={state.get(key)!r} was saved, this dataset has {mine!r}")
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int)) or not (
            0 <= position <= len(self.pack)
        ):
            raise ValueError(f"data state: (epoch, position)=({epoch}, {position}) out of range")
        self.epoch, self.position = epoch, position
