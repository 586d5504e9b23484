"""Tokenizers for rustforge: gpt-oss's o200k_harmony vocabulary and tiny trained BPEs, one wrapper for both.

Built on Hugging Face `tokenizers` (fast, serialisable to the tokenizer.json that gpt-oss checkpoints ship)
with `quicktok` as the offline source of the o200k_harmony vocabulary: quicktok bundles the exact tiktoken
ranks, from which `o200k_harmony_tokenizer()` builds an equivalent byte-level BPE (the o200k split regex,
every two-piece merge ordered by the rank of its result, whole-word lookup first like tiktoken), so ids
equal tiktoken's. `train_tiny_tokenizer` trains a small byte-level BPE on Rust source for the CPU-sized
model; it carries the same Harmony special tokens (at its own small ids), so the Harmony codec in
`rustforge.data.harmony` works unchanged on either vocabulary.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import quicktok
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# ------------------------------------------------------------------------------------ special tokens
O200K_HARMONY_VOCAB_SIZE = 201088
_O200K_BASE_RANKS = 199998  # mergeable (byte-level) tokens; every id from here on is special

_NAMED_SPECIALS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}


def _harmony_special_tokens() -> dict[str, int]:
    named_ids = set(_NAMED_SPECIALS.values())
    reserved = {
        f"<|reserved_{i}|>": i
        for i in range(_O200K_BASE_RANKS, O200K_HARMONY_VOCAB_SIZE)
        if i not in named_ids
    }
    # tiktoken's table also aliases <|reserved_200018|> to 200018; one id has one token here (like
    # gpt-oss's tokenizer.json), so the alias is dropped in favour of <|endofprompt|>.
    return dict(sorted({**_NAMED_SPECIALS, **reserved}.items(), key=lambda kv: kv[1]))


# token -> id for every special token of o200k_harmony (199998..201087, one token per id).
HARMONY_SPECIAL_TOKENS: dict[str, int] = _harmony_special_tokens()

# The specials the Harmony codec emits or parses, plus the document markers; every rustforge tokenizer
# must have each as a single token.
REQUIRED_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|return|>",
    "<|constrain|>",
    "<|channel|>",
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|call|>",
    "<|endofprompt|>",
)

# Specials a tiny tokenizer gets: all of o200k_harmony's up to <|endofprompt|>, in o200k's order.
TINY_SPECIAL_TOKENS: tuple[str, ...] = tuple(
    tok for tok, i in HARMONY_SPECIAL_TOKENS.items() if i <= _NAMED_SPECIALS["<|endofprompt|>"]
)

# tiktoken's o200k split pattern (identical in o200k_base and o200k_harmony).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Text on which a checkpoint's tokenizer.json must give the same ids as o200k_harmony.
O200K_PROBE_TEXT = (
    "<|start|>user<|message|>Fix the borrow error in `fn main()`:\n\n"
    "```rust\nuse std::collections::HashMap;\n\nfn main() {\n    let mut m: HashMap<&str, Vec<u32>> = "
    'HashMap::new();\n    let v = m.entry("k").or_default();\n    v.push(42_u32);\n'
    "    println!(\"{:?} — ünïcødé 世界 🦀\", m);\n}\n```\n\t\r\n   It's DON'T  12345 3.14e-10<|end|>"
)


# ------------------------------------------------------------------------------------------ wrapper
class RustforgeTokenizer:
    """A `tokenizers.Tokenizer` whose Harmony special tokens are single tokens, with their ids at hand."""

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>"):
        self._tokenizer = tokenizer
        self._plain_tokenizer: Tokenizer | None = None
        self._fingerprint: dict | None = None
        missing = [tok for tok in REQUIRED_SPECIAL_TOKENS if tokenizer.token_to_id(tok) is None]
        if missing:
            raise ValueError(f"{source}: tokenizer lacks Harmony special tokens {missing}")
        ids = {tok: tokenizer.token_to_id(tok) for tok in REQUIRED_SPECIAL_TOKENS}
        self.startoftext_id = ids["<|startoftext|>"]
        self.endoftext_id = ids["<|endoftext|>"]
        self.return_id = ids["<|return|>"]
        self.constrain_id = ids["<|constrain|>"]
        self.channel_id = ids["<|channel|>"]
        self.start_id = ids["<|start|>"]
        self.end_id = ids["<|end|>"]
        self.message_id = ids["<|message|>"]
        self.call_id = ids["<|call|>"]
        self.endofprompt_id = ids["<|endofprompt|>"]
        self.pad_id = self.endoftext_id  # as gpt-oss's config: pad with <|endoftext|>
        self.special_ids: frozenset[int] = frozenset(
            i for i, added in tokenizer.get_added_tokens_decoder().items() if added.special
        )
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def hf_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def _plain(self) -> Tokenizer:
        """A clone that encodes special-token text as ordinary text (allow_special=False). A separate
        object because the flag belongs to the tokenizer and flipping it per call would race between
        threads; built on first use since cloning o200k takes about a second."""
        if self._plain_tokenizer is None:
            plain = Tokenizer.from_str(self._tokenizer.to_str())
            plain.encode_special_tokens = True
            self._plain_tokenizer = plain
        return self._plain_tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids (highest id + 1, specials included): the embedding rows a model needs."""
        return self._vocab_size

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Ids of `text`; with allow_special=False, special-token text such as "<|end|>" is plain text."""
        tokenizer = self._tokenizer if allow_special else self._plain
        return tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """Ids of many texts, encoded in parallel. Special-token text is plain text by default here,
        since batches are usually raw documents: a Rust file that mentions "<|endoftext|>" must not
        end itself."""
        tokenizer = self._tokenizer if allow_special else self._plain
        return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def fingerprint(self) -> dict:
        """Identifies the vocabulary and its rules (for cache keys): size and sha256 of tokenizer.json."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self._tokenizer.to_str().encode()).hexdigest()
            self._fingerprint = {"vocab_size": self.vocab_size, "sha256": digest}
        return dict(self._fingerprint)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens written out; bytes that are not valid UTF-8 become U+FFFD."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def save(self, directory: str | Path) -> Path:
        """Write `directory`/tokenizer.json (created if needed); returns the file's path."""
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(path))
        return path

    @classmethod
    def from_file(cls, path_or_dir: str | Path) -> RustforgeTokenizer:
        """Load a tokenizer.json, or the tokenizer.json inside a directory."""
        path = Path(path_or_dir)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{path}: tokenizer file not found")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path}: not a valid tokenizers tokenizer.json ({err})") from err
        return cls(tokenizer, source=str(path))

    def __repr__(self) -> str:
        return f"RustforgeTokenizer(vocab_size={self.vocab_size})"


def _special_added_tokens(tokens: Iterable[str]) -> list[AddedToken]:
    return [AddedToken(tok, special=True, normalized=False) for tok in tokens]


def _byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# --------------------------------------------------------------------------------- tiny trained BPE
def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> RustforgeTokenizer:
    """Byte-level BPE of `vocab_size` ids (specials included) trained on `texts`; deterministic.

    The specials take ids 0..20 (o200k_harmony's <|startoftext|>..<|endofprompt|> in order), the 256
    byte symbols follow, so any text round-trips whatever the corpus.
    """
    minimum = len(TINY_SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is below the minimum {minimum} (specials + 256 bytes)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=_special_added_tokens(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return RustforgeTokenizer(tokenizer, source="train_tiny_tokenizer")


# ------------------------------------------------------------------------------------- o200k_harmony
def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level BPE vocabularies are spelt in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def o200k_base_ranks() -> list[bytes]:
    """The byte string of each mergeable o200k token, indexed by rank (= id), from quicktok."""
    encoding = quicktok.get_encoding("o200k_harmony")
    return [encoding.decode_single_token_bytes(rank) for rank in range(_O200K_BASE_RANKS)]


def _bpe_vocab_and_merges(ranks: list[bytes]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> HF vocab + merges. tiktoken merges the adjacent pair whose concatenation has the
    lowest rank; listing every split of every token, ordered by the rank of the token, reproduces that."""
    byte_to_char = _gpt2_byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    rank_of = {token: rank for rank, token in enumerate(ranks)}
    vocab = {spell(token): rank for rank, token in enumerate(ranks)}
    merges: list[tuple[str, str]] = []
    for token in ranks:
        splits = [
            (rank_of[token[:k]], rank_of[token[k:]], k)
            for k in range(1, len(token))
            if token[:k] in rank_of and token[k:] in rank_of
        ]
        merges.extend((spell(token[:k]), spell(token[k:])) for _, _, k in sorted(splits))
    return vocab, merges


@functools.lru_cache(maxsize=1)
def o200k_harmony_tokenizer() -> RustforgeTokenizer:
    """gpt-oss's tokenizer (201088 ids), built offline from quicktok's o200k ranks; cached per process."""
    vocab, merges = _bpe_vocab_and_merges(o200k_base_ranks())
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in tiktoken.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(_special_added_tokens(HARMONY_SPECIAL_TOKENS))
    _assert_special_ids(tokenizer)
    return RustforgeTokenizer(tokenizer, source="o200k_harmony")


def _assert_special_ids(tokenizer: Tokenizer) -> None:
    wrong = {
        t: tokenizer.token_to_id(t)
        for t, i in HARMONY_SPECIAL_TOKENS.items()
        if tokenizer.token_to_id(t) != i
    }
    if wrong:
        raise RuntimeError(f"o200k_harmony special tokens got wrong ids: {dict(list(wrong.items())[:5])}")


def check_tokenizer_against_o200k(tok: RustforgeTokenizer, probe_text: str = O200K_PROBE_TEXT) -> list[str]:
    """Differences between `tok` and o200k_harmony (special ids, ids of a probe text); [] if none.

    The reference is quicktok's own encoder, so this also works without building the HF o200k tokenizer.
    """
    reference = quicktok.get_encoding("o200k_harmony")
    mismatches = []
    for token in REQUIRED_SPECIAL_TOKENS:
        ours, theirs = tok.token_to_id(token), HARMONY_SPECIAL_TOKENS[token]
        if ours != theirs:
            mismatches.append(f"special token {token}: id {ours}, o200k_harmony has {theirs}")
    ours_ids = tok.encode(probe_text, allow_special=True)
    theirs_ids = reference.encode(probe_text, allowed_special="all")
    if ours_ids != theirs_ids:
        at = next(
            (i for i, (a, b) in enumerate(zip(ours_ids, theirs_ids, strict=False)) if a != b),
            min(len(ours_ids), len(theirs_ids)),
        )
        mismatches.append(
            f"probe text: ids differ from o200k_harmony at token {at} "
            f"(ours {ours_ids[at : at + 5]}, o200k {theirs_ids[at : at + 5]}; "
            f"lengths {len(ours_ids)} vs {len(theirs_ids)})"
        )
    return mismatches


def load_tokenizer(model_dir: str | Path | None) -> RustforgeTokenizer:
    """`model_dir`/tokenizer.json if there is one, else o200k_harmony (gpt-oss's own vocabulary)."""
    if model_dir is None:
        return o200k_harmony_tokenizer()
    directory = Path(model_dir)
    if not directory.is_dir():
        raise ValueError(f"{directory}: model directory not found")
    path = directory / "tokenizer.json"
    if not path.exists():
        return o200k_harmony_tokenizer()
    tok = RustforgeTokenizer.from_file(path)
    if tok.vocab_size == O200K_HARMONY_VOCAB_SIZE:  # a gpt-oss tokenizer.json: it must be o200k_harmony
        mismatches = check_tokenizer_against_o200k(tok)
        if mismatches:
            raise ValueError(f"{path}: differs from o200k_harmony: " + "; ".join(mismatches[:5]))
    return tok


def write_tiktoken_file(path: str | Path) -> Path:
    """Write o200k_base.tiktoken (base64 token, space, rank per line) -- the file tiktoken and
    openai-harmony download -- from quicktok's ranks, byte-identical to OpenAI's published file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(o200k_base_ranks()))
    path.write_text("".join(lines), encoding="ascii")
    return path


__all__ = [
    "HARMONY_SPECIAL_TOKENS",
    "O200K_HARMONY_VOCAB_SIZE",
    "O200K_PATTERN",
    "REQUIRED_SPECIAL_TOKENS",
    "TINY_SPECIAL_TOKENS",
    "RustforgeTokenizer",
    "check_tokenizer_against_o200k",
    "load_tokenizer",
    "o200k_base_ranks",
    "o200k_harmony_tokenizer",
    "train_tiny_tokenizer",
    "write_tiktoken_file",
]
