"""Tokenizers: o200k_harmony built from quicktok's ranks matches quicktok (= tiktoken) id for id, the Harmony
special tokens are single tokens with gpt-oss's ids, and the tiny trained BPE round-trips any text."""

from __future__ import annotations

import glob
import hashlib
import json
import random

import pytest
import quicktok
from hypothesis import given, settings
from hypothesis import strategies as st

from rustforge.data.tokenizer import (
    HARMONY_SPECIAL_TOKENS,
    REQUIRED_SPECIAL_TOKENS,
    TINY_SPECIAL_TOKENS,
    RustforgeTokenizer,
    check_tokenizer_against_o200k,
    load_tokenizer,
    o200k_harmony_tokenizer,
    train_tiny_tokenizer,
    write_tiktoken_file,
)

HYPOTHESIS = settings(max_examples=150, deadline=None, derandomize=True)
# sha256 of openaipublic's o200k_base.tiktoken (the hash openai-harmony and tiktoken check)
O200K_BASE_TIKTOKEN_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
SNIPPETS = [
    "",
    'fn main() {\n    println!("Hello, world!");\n}\n',
    "impl<'a, T: Clone + Send> Iterator for Iter<'a, T> {\n\ttype Item = &'a T;\n}",
    'let s = "héllo wörld — 世界 🦀"; // ünïcødé\r\n',
    "    \n\n\n        \t\t  \u00a0\u3000 trailing   ",
    "#[derive(Debug)]\nstruct P { x: f64, y: f64 } // 3.14e-10 0xFF_u8 1_000_000",
    "I'm sure it's DON'T WON'T they'll we've",
    "<|end|> looks like a special token but is text",
]


def _rust_sources(count: int) -> list[str]:
    files = sorted(glob.glob("/usr/share/cargo/registry/**/*.rs", recursive=True))
    if not files:
        pytest.skip("no Rust sources under /usr/share/cargo/registry")
    step = max(1, len(files) // count)
    return [open(f, encoding="utf-8", errors="replace").read() for f in files[::step][:count]]


@pytest.fixture(scope="module")
def rust_texts():
    return _rust_sources(200)


@pytest.fixture(scope="module")
def quick():
    return quicktok.get_encoding("o200k_harmony")


@pytest.fixture(scope="module")
def o200k():
    return o200k_harmony_tokenizer()


@pytest.fixture(scope="module")
def tiny(rust_texts):
    return train_tiny_tokenizer(rust_texts, vocab_size=2048)


# --------------------------------------------------------------------------------- special tokens
def test_special_token_table_matches_quicktok(quick):
    assert len(HARMONY_SPECIAL_TOKENS) == 201088 - 199998
    assert sorted(HARMONY_SPECIAL_TOKENS.values()) == list(range(199998, 201088))
    for token, token_id in HARMONY_SPECIAL_TOKENS.items():
        assert quick.encode_single_token(token) == token_id, token
    # tiktoken aliases <|reserved_200018|> to <|endofprompt|>'s id; the table keeps one name per id
    assert quick.special_tokens_set - set(HARMONY_SPECIAL_TOKENS) == {"<|reserved_200018|>"}
    named = {
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
        "<|reserved_201087|>": 201087,
    }
    assert {t: HARMONY_SPECIAL_TOKENS[t] for t in named} == named


def test_o200k_specials_are_single_tokens_with_gpt_oss_ids(o200k):
    assert o200k.vocab_size == 201088
    assert o200k.token_to_id("assistant") == 173781
    for token in REQUIRED_SPECIAL_TOKENS:
        assert o200k.encode(token) == [HARMONY_SPECIAL_TOKENS[token]]
    assert (
        o200k.start_id,
        o200k.end_id,
        o200k.message_id,
        o200k.channel_id,
        o200k.constrain_id,
        o200k.return_id,
        o200k.call_id,
        o200k.endoftext_id,
        o200k.pad_id,
    ) == (200006, 200007, 200008, 200005, 200003, 200002, 200012, 199999, 199999)
    assert o200k.special_ids == frozenset(HARMONY_SPECIAL_TOKENS.values())


def test_allow_special_false_encodes_special_text_as_text(o200k, quick):
    text = "<|start|>assistant<|message|>hi<|end|>"
    plain = o200k.encode(text, allow_special=False)
    assert plain == quick.encode_ordinary(text)
    assert not set(plain) & o200k.special_ids
    assert o200k.encode(text) == [200006, 173781, 200008, 3686, 200007]


def test_encode_batch_matches_encode(tiny):
    texts = SNIPPETS + ["<|endoftext|> in a doc"]
    assert tiny.encode_batch(texts) == [tiny.encode(t, allow_special=False) for t in texts]
    assert tiny.encode_batch(texts, allow_special=True) == [tiny.encode(t) for t in texts]
    assert tiny.endoftext_id not in tiny.encode_batch(texts)[-1]


def test_fingerprint_tells_vocabularies_apart(tiny, o200k, tmp_path):
    assert tiny.fingerprint() == RustforgeTokenizer.from_file(tiny.save(tmp_path)).fingerprint()
    assert tiny.fingerprint() != o200k.fingerprint()
    assert json.loads(json.dumps(o200k.fingerprint()))["vocab_size"] == 201088


# ------------------------------------------------------------------------------- o200k equivalence
def test_o200k_matches_quicktok_on_rust_and_tricky_text(o200k, quick, rust_texts):
    rng = random.Random(0)
    probes = list(SNIPPETS)
    for source in rust_texts:  # a few hundred windows of real Rust, cut at arbitrary places
        start = rng.randrange(max(1, len(source)))
        probes.append(source[start : start + rng.randrange(1, 400)])
    probes += ["".join(rng.choice(" \t\n\r\u00a0xé1'") for _ in range(rng.randrange(40))) for _ in range(100)]
    mismatches = [p for p in probes if o200k.encode(p, allow_special=False) != quick.encode_ordinary(p)]
    assert not mismatches, f"{len(mismatches)} of {len(probes)} differ, e.g. {mismatches[0]!r}"


@HYPOTHESIS
@given(text=unicode_text)
def test_o200k_matches_quicktok_on_any_text(text, o200k, quick):
    assert o200k.encode(text, allow_special=False) == quick.encode_ordinary(text)
    assert o200k.decode(o200k.encode(text)) == text


def test_o200k_specials_inside_text_match_quicktok(o200k, quick):
    text = "<|start|>user<|message|>Fix `x`.<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>"
    assert o200k.encode(text) == quick.encode(text, allowed_special="all")
    assert o200k.decode(o200k.encode(text)) == text


def test_tiktoken_file_is_byte_identical_to_openais(tmp_path):
    path = write_tiktoken_file(tmp_path / "o200k_base.tiktoken")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == O200K_BASE_TIKTOKEN_SHA256


def test_check_against_o200k(o200k, tiny):
    assert check_tokenizer_against_o200k(o200k) == []
    problems = check_tokenizer_against_o200k(tiny)
    assert any("<|start|>" in p for p in problems) and any("probe text" in p for p in problems)


# ------------------------------------------------------------------------------------ tiny tokenizer
def test_tiny_tokenizer_has_specials_and_requested_size(tiny):
    assert tiny.vocab_size == 2048
    assert [tiny.token_to_id(t) for t in TINY_SPECIAL_TOKENS] == list(range(len(TINY_SPECIAL_TOKENS)))
    for token in REQUIRED_SPECIAL_TOKENS:
        assert tiny.encode(token) == [tiny.token_to_id(token)]
        assert len(tiny.encode(token, allow_special=False)) > 1
    assert tiny.pad_id == tiny.endoftext_id


def test_tiny_tokenizer_learns_rust(tiny, rust_texts):
    sample = rust_texts[0][:2000]
    assert len(tiny.encode(sample)) < len(sample.encode()) / 2.5  # merges carry real compression
    assert tiny.token_to_id("Ġfn") is not None and tiny.token_to_id("Ġself") is not None


@pytest.mark.parametrize("snippet", SNIPPETS)
def test_tiny_tokenizer_round_trips_snippets(tiny, snippet):
    assert tiny.decode(tiny.encode(snippet, allow_special=False)) == snippet


@HYPOTHESIS
@given(text=unicode_text)
def test_tiny_tokenizer_round_trips_any_text(text, tiny):
    assert tiny.decode(tiny.encode(text, allow_special=False)) == text


def test_tiny_training_is_deterministic():
    texts = _rust_sources(40)
    first, second = train_tiny_tokenizer(texts, 700), train_tiny_tokenizer(texts, 700)
    assert first.hf_tokenizer.to_str() == second.hf_tokenizer.to_str()


def test_tiny_vocab_size_below_minimum_is_refused():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tiny_tokenizer(["fn main() {}"], 100)


# --------------------------------------------------------------------------------- files & loading
def test_save_and_from_file(tiny, tmp_path):
    path = tiny.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    for loaded in (RustforgeTokenizer.from_file(path), RustforgeTokenizer.from_file(path.parent)):
        assert loaded.encode(SNIPPETS[2]) == tiny.encode(SNIPPETS[2])
        assert (loaded.start_id, loaded.vocab_size) == (tiny.start_id, tiny.vocab_size)


def test_from_file_errors_name_the_file(tmp_path, tiny):
    with pytest.raises(ValueError, match="missing.json: tokenizer file not found"):
        RustforgeTokenizer.from_file(tmp_path / "missing.json")
    corrupt = tmp_path / "corrupt" / "tokenizer.json"
    corrupt.parent.mkdir()
    corrupt.write_text('{"model": ')
    with pytest.raises(ValueError, match=str(corrupt)):
        RustforgeTokenizer.from_file(corrupt)
    no_specials = json.loads(tiny.hf_tokenizer.to_str())
    no_specials["added_tokens"] = [t for t in no_specials["added_tokens"] if t["content"] != "<|call|>"]
    no_specials["model"]["vocab"].pop("<|call|>")
    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps(no_specials))
    with pytest.raises(
        ValueError, match=r"lacking.json: tokenizer lacks Harmony special tokens \['<\|call\|>'\]"
    ):
        RustforgeTokenizer.from_file(lacking)


def test_load_tokenizer(tmp_path, tiny, o200k):
    assert load_tokenizer(None) is o200k
    assert load_tokenizer(tmp_path) is o200k  # a model dir without tokenizer.json: gpt-oss's vocabulary
    tiny.save(tmp_path / "model")
    assert load_tokenizer(tmp_path / "model").vocab_size == tiny.vocab_size
    with pytest.raises(ValueError, match="nowhere: model directory not found"):
        load_tokenizer(tmp_path / "nowhere")


def test_gpt_oss_tokenizer_json_is_checked_against_o200k(tmp_path):
    import json

    from rustforge.data.tokenizer import O200K_PROBE_TEXT, load_tokenizer, o200k_harmony_tokenizer

    good = tmp_path / "good"
    o200k_harmony_tokenizer().save(good)
    assert load_tokenizer(good).vocab_size == 201088

    data = json.loads((good / "tokenizer.json").read_text())
    ids = [i for i in o200k_harmony_tokenizer().encode(O200K_PROBE_TEXT, allow_special=True) if i < 199998]
    a, b = ids[0], next(i for i in ids if i != ids[0])
    vocab = data["model"]["vocab"]
    tok_a = next(t for t, i in vocab.items() if i == a)
    tok_b = next(t for t, i in vocab.items() if i == b)
    vocab[tok_a], vocab[tok_b] = b, a  # two ids swapped: a silently different tokenizer
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="tokenizer.json: differs from o200k_harmony"):
        load_tokenizer(bad)
