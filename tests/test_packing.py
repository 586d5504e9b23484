"""Packing: BFD against a naive reference, token accounting, per-document positions/labels, collate,
and exact resume of PackedDataset."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from rustforge.config import PackingConfig
from rustforge.data.packing import (
    IGNORE_INDEX,
    PackedDataset,
    PackedSequence,
    best_fit_decreasing,
    collate,
    pack_documents,
)


def make_docs(lengths) -> list[list[int]]:
    """Documents whose tokens are globally unique (doc * 100_000 + i), so any mix-up is visible."""
    return [[d * 100_000 + i for i in range(n)] for d, n in enumerate(lengths)]


def random_lengths(n: int, high: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, high, size=n).tolist()


def naive_best_fit_loads(sizes: list[int], capacity: int) -> list[int]:
    """Textbook BFD: scan every bin for the fullest that fits. Returns sorted bin loads."""
    loads: list[int] = []
    for size in sorted(sizes, reverse=True):
        fitting = [b for b, load in enumerate(loads) if load + size <= capacity]
        if fitting:
            best = max(fitting, key=lambda b: loads[b])
            loads[best] += size
        else:
            loads.append(size)
    return sorted(loads)


@pytest.mark.parametrize("seed", range(5))
def test_bfd_matches_naive_reference_and_respects_capacity(seed):
    sizes = random_lengths(300, 120, seed)
    bins = best_fit_decreasing(sizes, 128, seed=seed)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))  # each item exactly once
    loads = [sum(sizes[i] for i in b) for b in bins]
    assert max(loads) <= 128
    # ties between equal remaining capacities are interchangeable, so the loads match the textbook BFD
    assert sorted(loads) == naive_best_fit_loads(sizes, 128)


def test_bfd_rejects_items_that_cannot_fit():
    with pytest.raises(ValueError, match="item sizes"):
        best_fit_decreasing([5, 11], 10)


def check_sequence(seq: PackedSequence, seq_len: int) -> None:
    """Structural invariants of one packed sequence."""
    n = len(seq)
    assert 0 < n <= seq_len
    assert all(len(a) == n for a in (seq.position_ids, seq.doc_ids, seq.labels))
    starts = np.flatnonzero(np.diff(seq.doc_ids, prepend=-1))
    assert seq.doc_ids[0] == 0 and np.all(np.diff(seq.doc_ids) >= 0)
    assert np.array_equal(seq.doc_ids[starts], np.arange(len(starts)))  # 0, 1, 2... contiguous
    for start, end in zip(starts, list(starts[1:]) + [n]):
        assert np.array_equal(seq.position_ids[start:end], np.arange(end - start))  # restarts at 0
        assert seq.labels[end - 1] == IGNORE_INDEX  # the last token never predicts the next document
    real = np.flatnonzero(seq.labels != IGNORE_INDEX)
    assert np.all(real < n - 1)
    assert np.array_equal(seq.doc_ids[real], seq.doc_ids[real + 1])  # never across a boundary
    assert np.array_equal(seq.labels[real], seq.input_ids[real + 1])


@pytest.mark.parametrize("mode", ["split", "truncate"])
def test_pack_accounts_for_every_token(mode):
    seq_len = 64
    lengths = random_lengths(400, 200, seed=1) + [0, 1, 64, 65]
    docs = make_docs(lengths)
    cfg = PackingConfig(long_docs=mode, split_overlap=8, min_piece_tokens=4)
    result = pack_documents(docs, seq_len, cfg, seed=1)
    s = result.stats
    for seq in result.sequences:
        check_sequence(seq, seq_len)
    placed = np.concatenate([seq.input_ids for seq in result.sequences])
    assert len(placed) == s.real_tokens
    assert s.sequences == len(result.sequences)
    assert s.efficiency == s.real_tokens / (len(result.sequences) * seq_len)
    assert s.efficiency > 0.95
    assert s.real_tokens - s.overlap_tokens + s.truncated_tokens == sum(lengths)
    assert s.loss_tokens == sum(int((seq.labels != IGNORE_INDEX).sum()) for seq in result.sequences)
    assert (s.docs, s.empty_docs) == (len(lengths), 1)
    assert s.long_docs == sum(n > seq_len for n in lengths)
    if mode == "truncate":
        assert s.overlap_tokens == 0 and s.truncated_tokens == sum(max(n - seq_len, 0) for n in lengths)
        assert sorted(placed.tolist()) == sorted(t for d in docs for t in d[:seq_len])


def pieces_of(result, doc: int) -> list[np.ndarray]:
    """(tokens, labels) of every piece of `doc`, in document order."""
    found = []
    for seq, layout in zip(result.sequences, result.layout):
        for k, piece in enumerate(layout):
            if piece.doc == doc:
                mask = seq.doc_ids == k
                found.append((piece.start, seq.input_ids[mask], seq.labels[mask]))
    return [(ids, labels) for _, ids, labels in sorted(found, key=lambda f: f[0])]


def test_split_with_overlap_reconstructs_the_document_and_predicts_each_token_once():
    seq_len, overlap = 32, 8
    doc = list(range(1000, 1000 + 150))  # 150 = 32 + 3 * 24 + 46 -> 6 pieces, last one 6 tokens
    cfg = PackingConfig(long_docs="split", split_overlap=overlap, min_piece_tokens=4)
    result = pack_documents([doc, [7] * 10], seq_len, cfg)
    pieces = pieces_of(result, 0)
    assert len(pieces) == 6
    rebuilt = list(pieces[0][0])
    for (prev, _), (ids, _) in zip(pieces, pieces[1:]):
        assert np.array_equal(ids[:overlap], prev[-overlap:])  # the overlap repeats the previous tail
        rebuilt += list(ids[overlap:])
    assert rebuilt == doc
    targets = [t for _, labels in pieces for t in labels.tolist() if t != IGNORE_INDEX]
    assert targets == doc[1:]  # every token but the first is a target exactly once, in order


def test_split_drops_short_tail_and_truncate_cuts():
    seq_len = 32
    doc = list(range(40))  # pieces [0, 32) and [24, 40): 16 tokens, 8 of them new
    split = pack_documents([doc], seq_len, PackingConfig("split", split_overlap=8, min_piece_tokens=20))
    assert split.stats.dropped_pieces == 1 and split.stats.truncated_tokens == 8
    assert [len(s) for s in split.sequences] == [32]
    truncated = pack_documents([doc], seq_len, PackingConfig("truncate"))
    assert truncated.stats.truncated_tokens == 8
    assert truncated.sequences[0].input_ids.tolist() == doc[:32]
    assert truncated.sequences[0].labels.tolist() == doc[1:32] + [IGNORE_INDEX]


def test_bad_packing_config_names_the_field():
    with pytest.raises(ValueError, match="packing.long_docs"):
        pack_documents([[1]], 8, PackingConfig(long_docs="wrap"))
    with pytest.raises(ValueError, match="packing.split_overlap"):
        pack_documents([[1]], 8, PackingConfig(split_overlap=8))
    with pytest.raises(ValueError, match="packing.min_piece_tokens"):
        pack_documents([[1]], 8, PackingConfig(split_overlap=2, min_piece_tokens=9))


def test_packs_100k_documents_quickly():
    lengths = np.random.default_rng(0).lognormal(5.0, 1.2, size=100_000).astype(int) + 1
    docs = [range(n) for n in lengths.tolist()]  # lazily indexable token lists: no memory for tokens
    start = time.perf_counter()
    result = pack_documents(docs, 2048, PackingConfig())
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"packing 100k docs took {elapsed:.1f} s"
    assert result.stats.efficiency > 0.99
    check_sequence(result.sequence(0), 2048)


def test_collate_pads_every_field():
    docs = make_docs([5, 3, 9])
    result = pack_documents(docs, 10, PackingConfig(split_overlap=2, min_piece_tokens=2))
    batch = collate(result.sequences, 12, pad_id=-7)
    assert set(batch) == {"input_ids", "position_ids", "doc_ids", "labels"}
    for tensor in batch.values():
        assert tensor.dtype == torch.long and tensor.shape == (len(result.sequences), 12)
    for row, seq in enumerate(result.sequences):
        n = len(seq)
        assert batch["input_ids"][row, :n].tolist() == seq.input_ids.tolist()
        assert batch["labels"][row, :n].tolist() == seq.labels.tolist()
        assert set(batch["input_ids"][row, n:].tolist()) == {-7}
        assert set(batch["position_ids"][row, n:].tolist()) == {0}
        assert set(batch["doc_ids"][row, n:].tolist()) == {-1}
        assert set(batch["labels"][row, n:].tolist()) == {IGNORE_INDEX}
    with pytest.raises(ValueError, match="seq_len"):
        collate(result.sequences, 4, pad_id=0)


SMALL = PackingConfig(split_overlap=8, min_piece_tokens=4)


def dataset(seq_len: int = 64, seed: int = 11) -> PackedDataset:
    docs = make_docs(random_lengths(300, 40, seed=5))
    return PackedDataset(docs, seq_len, SMALL, batch_size=4, pad_id=-1, seed=seed)


def test_dataset_resume_gives_identical_batches():
    ds = dataset()
    per_epoch = len(ds)
    for _ in range(per_epoch + 3):  # into the second epoch
        next(ds)
    state = ds.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3 * 4)
    expected = [next(ds) for _ in range(per_epoch)] + [ds.next_batch(3) for _ in range(5)]  # crosses epochs

    resumed = dataset()
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(per_epoch)] + [resumed.next_batch(3) for _ in range(5)]
    assert [b["input_ids"].shape[0] for b in got[-5:]] == [3] * 5
    for a, b in zip(got, expected, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_dataset_epochs_cover_distinct_sequences_and_reshuffle():
    ds = dataset()
    # tokens are globally unique, so a row's first token identifies its packed sequence
    epochs = [[tuple(next(ds)["input_ids"][:, 0].tolist()) for _ in range(len(ds))] for _ in range(2)]
    for batches in epochs:
        rows = [r for b in batches for r in b]
        assert len(set(rows)) == len(rows) == len(ds) * 4 >= len(ds.pack) - 3  # no repeat, remainder < batch
    assert epochs[0] != epochs[1]
    first = next(dataset())
    assert torch.equal(next(dataset())["input_ids"], first["input_ids"])  # same seed, same first batch
    assert not torch.equal(next(dataset(seed=12))["input_ids"], first["input_ids"])


def test_dataset_refuses_foreign_state_and_too_few_sequences():
    state = dataset().state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        dataset(seq_len=128).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        dataset().load_state_dict({**state, "position": 10**6})
    with pytest.raises(ValueError, match="batch_size"):
        PackedDataset(make_docs([3, 4]), seq_len=64, batch_size=2, cfg=SMALL)
