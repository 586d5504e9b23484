"""Token ids of a corpus split, cached on disk as one int32 array plus offsets (numpy .npz).

The cache key covers every document's hash and the tokenizer's fingerprint, so a changed corpus or
tokenizer can never be served stale ids. Documents come back as int32 numpy views, which packing takes
as they are (a 20B-scale corpus as Python lists would cost ~10x the memory).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from rustforge.data.corpus import iter_documents


def tokenize_split(corpus_dir: str | Path, tokenizer, split: str, cache_dir: Path) -> list[np.ndarray]:
    """Every document of `split`, each ending with <|endoftext|>, as int32 arrays."""
    docs = list(iter_documents(corpus_dir, split))
    key = hashlib.sha256()
    for d in docs:
        key.update(d["sha256"].encode())
    key.update(json.dumps(tokenizer.fingerprint()).encode())
    cache = Path(cache_dir) / f"tokens-{split}-{key.hexdigest()[:16]}.npz"
    if not cache.is_file():
        eos = tokenizer.endoftext_id
        ids = [tokens + [eos] for tokens in tokenizer.encode_batch([d["text"] for d in docs])]
        cache.parent.mkdir(parents=True, exist_ok=True)
        offsets = np.cumsum([0] + [len(x) for x in ids])
        flat = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids]) if ids else np.zeros(0, np.int32)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, ids=flat, offsets=offsets)
        tmp.replace(cache)
    data = np.load(cache)
    ids, offsets = data["ids"], data["offsets"]
    return [ids[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
