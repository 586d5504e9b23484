"""Harmony codec: token-for-token parity with openai-harmony 0.0.8, render -> parse round trips, the loss
mask, and one validator test per kind of broken completion.

openai-harmony downloads o200k_base.tiktoken unless TIKTOKEN_ENCODINGS_BASE names a directory holding
it; the fixture writes that file from quicktok's ranks (it checks OpenAI's sha256, so it must be exact).
"""

from __future__ import annotations

import glob
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

openai_harmony = pytest.importorskip("openai_harmony")

from rustforge.data import harmony as H  # noqa: E402
from rustforge.data.tokenizer import (  # noqa: E402
    o200k_harmony_tokenizer,
    train_tiny_tokenizer,
    write_tiktoken_file,
)

HYPOTHESIS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def o200k():
    return o200k_harmony_tokenizer()


@pytest.fixture(scope="module")
def tiny():
    files = sorted(glob.glob("/usr/share/cargo/registry/**/*.rs", recursive=True))[::60]
    if not files:
        pytest.skip("no Rust sources under /usr/share/cargo/registry")
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in files]
    return train_tiny_tokenizer(texts, vocab_size=1024)


@pytest.fixture(scope="module")
def harmony_encoding(tmp_path_factory):
    vocab_dir = tmp_path_factory.mktemp("tiktoken")
    write_tiktoken_file(vocab_dir / "o200k_base.tiktoken")
    saved = {k: os.environ.get(k) for k in ("TIKTOKEN_ENCODINGS_BASE", "TIKTOKEN_RS_CACHE_DIR")}
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(vocab_dir)
    os.environ["TIKTOKEN_RS_CACHE_DIR"] = str(vocab_dir)
    try:
        yield openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ----------------------------------------------------------------------------- ours -> openai-harmony
def _harmony_namespace(ns: H.ToolNamespace):
    tools = [
        openai_harmony.ToolDescription.new(t.name, t.description, parameters=t.parameters) for t in ns.tools
    ]
    return openai_harmony.ToolNamespaceConfig(name=ns.name, description=ns.description, tools=tools)


def _harmony_tools(namespaces):
    return None if namespaces is None else {ns.name: _harmony_namespace(ns) for ns in namespaces}


def _harmony_content(content):
    if isinstance(content, H.SystemContent):
        effort = content.reasoning_effort
        channels = content.valid_channels
        return openai_harmony.SystemContent(
            model_identity=content.model_identity,
            reasoning_effort=None if effort is None else openai_harmony.ReasoningEffort(effort.capitalize()),
            conversation_start_date=content.current_date,
            knowledge_cutoff=content.knowledge_cutoff,
            channel_config=None
            if channels is None
            else openai_harmony.ChannelConfig(
                valid_channels=list(channels), channel_required=content.channel_required
            ),
            tools=_harmony_tools(content.tools),
        )
    if isinstance(content, H.DeveloperContent):
        return openai_harmony.DeveloperContent(
            instructions=content.instructions, tools=_harmony_tools(content.tools)
        )
    return openai_harmony.TextContent(text=content)


def to_harmony(messages):
    out = []
    for m in messages:
        author = openai_harmony.Author(role=openai_harmony.Role(m.role), name=m.name)
        out.append(
            openai_harmony.Message(
                author=author,
                content=[_harmony_content(m.content)],
                channel=m.channel,
                recipient=m.recipient,
                content_type=m.content_type,
            )
        )
    return openai_harmony.Conversation.from_messages(out)


def as_text_message(m: H.Message, messages) -> H.Message:
    """What a parser gives back for `m`: structured content becomes its rendered text."""
    content = m.content
    if isinstance(content, H.SystemContent):
        content = H.render_system_content(content, H._has_function_tools(messages))
    elif isinstance(content, H.DeveloperContent):
        content = H.render_developer_content(content)
    return H.Message(m.role, content, m.channel, m.recipient, m.content_type, m.name)


# --------------------------------------------------------------------------------------- strategies
# Text as users write it, plus the strings that break naive codecs: special-token text, whitespace runs,
# \r\n, unicode, JSON.
_TRICKY = [
    "<|end|>",
    "<|start|>assistant",
    "<|channel|>",
    "<|message|>",
    "<|return|>",
    " to=x",
    "\r\n",
    "\n\n",
    "   ",
    "\t",
    "é",
    "世界",
    "🦀",
    '{"a": 1}',
    "fn main() {}",
    "'s",
    "123456",
]
text = st.lists(
    st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=12), st.sampled_from(_TRICKY)),
    max_size=5,
).map("".join)
ident = st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True)
channel = st.sampled_from(H.CHANNELS)


def _schema(children):
    described = st.fixed_dictionaries(
        {},
        optional={
            "description": text,
            "title": text,
            "examples": st.lists(st.one_of(text, st.integers()), max_size=2),
        },
    )
    default = st.one_of(
        text,
        st.integers(-5, 5),
        st.booleans(),
        st.none(),
        st.sampled_from([0.5, 1.0]),
        st.lists(st.integers(0, 3), max_size=2),
    )
    leaf = st.one_of(
        st.just({"type": "string"}),
        st.lists(ident, min_size=1, max_size=3).map(lambda e: {"type": "string", "enum": e}),
        st.sampled_from(
            [
                {"type": "number"},
                {"type": "integer"},
                {"type": "boolean"},
                {"type": "null"},
                {"type": ["string", "null"]},
                {"type": ["integer", "string"]},
                {},
                {"type": "array"},
            ]
        ),
    )
    node = st.one_of(
        leaf,
        children.map(lambda c: {"type": "array", "items": c}),
        st.dictionaries(ident, children, max_size=3).flatmap(
            lambda props: st.lists(
                st.sampled_from(sorted(props) or ["x"]), max_size=len(props), unique=True
            ).map(lambda req: {"type": "object", "properties": props, "required": req})
        ),
        st.lists(children, min_size=1, max_size=3).map(lambda vs: {"oneOf": vs}),
    )
    extras = st.fixed_dictionaries({}, optional={"default": default, "nullable": st.booleans()})
    return st.tuples(node, described, extras).map(lambda t: {**t[1], **t[2], **t[0]})


schema = st.recursive(st.just({"type": "string"}), _schema, max_leaves=6)
parameters = st.dictionaries(ident, schema, max_size=3).flatmap(
    lambda props: st.lists(st.sampled_from(sorted(props) or ["x"]), unique=True, max_size=3).map(
        lambda req: {"type": "object", "properties": props, "required": req}
    )
)
tool = st.builds(
    H.ToolDescription, name=ident, description=text, parameters=st.one_of(st.none(), parameters, schema)
)
namespace = st.builds(
    H.ToolNamespace,
    name=st.one_of(st.just("functions"), ident),
    tools=st.lists(tool, max_size=3),
    description=st.one_of(st.none(), text),
)
namespaces = st.lists(namespace, max_size=2, unique_by=lambda ns: ns.name).map(lambda ns: ns or None)

system = st.builds(
    H.SystemContent,
    model_identity=st.one_of(st.none(), st.just(H.DEFAULT_MODEL_IDENTITY), text),
    reasoning_effort=st.one_of(st.none(), st.sampled_from(H.REASONING_EFFORTS)),
    knowledge_cutoff=st.one_of(st.none(), st.just("2024-06")),
    current_date=st.one_of(st.none(), st.just("2025-08-05")),
    valid_channels=st.one_of(
        st.none(), st.just(H.CHANNELS), st.lists(channel, max_size=3, unique=True).map(tuple)
    ),
    channel_required=st.booleans(),
    tools=namespaces,
).map(lambda c: H.Message("system", c))
developer = st.builds(H.DeveloperContent, instructions=st.one_of(st.none(), text), tools=namespaces).map(
    lambda c: H.Message("developer", c)
)
user = st.builds(H.Message, role=st.just("user"), content=text)
assistant = st.builds(H.Message, role=st.just("assistant"), content=text, channel=channel)
tool_call = st.builds(
    lambda name, args, ctype: H.Message(
        "assistant", json.dumps(args), "commentary", f"functions.{name}", ctype
    ),
    ident,
    st.dictionaries(ident, st.integers()),
    st.sampled_from([H.JSON_CONTENT_TYPE, "json", None]),
)
tool_result = st.builds(lambda name, out: H.tool_result_message(name, out), ident, text)
body = st.lists(st.one_of(user, assistant, assistant, tool_call, tool_result), min_size=1, max_size=6)
conversation = st.tuples(st.one_of(st.none(), system), st.one_of(st.none(), developer), body).map(
    lambda t: [m for m in t[:2] if m is not None] + t[2]
)
# what a model samples after <|start|>assistant: reasoning, preambles, tool calls, a final answer
thinking = st.builds(
    H.Message, role=st.just("assistant"), content=text, channel=st.sampled_from(["analysis", "commentary"])
)
answer = st.builds(H.Message, role=st.just("assistant"), content=text, channel=st.just("final"))
completion = st.tuples(st.lists(thinking, max_size=3), st.one_of(answer, tool_call)).map(
    lambda t: [*t[0], t[1]]
)


# ------------------------------------------------------------------------------ parity with harmony
@HYPOTHESIS
@given(messages=conversation)
def test_render_matches_openai_harmony(messages, o200k, harmony_encoding):
    conv = to_harmony(messages)
    keep = openai_harmony.RenderConversationConfig(auto_drop_analysis=False)
    drop = openai_harmony.RenderConversationConfig(auto_drop_analysis=True)

    ours = H.render_conversation(messages, o200k, for_training=True)
    assert ours.ids == harmony_encoding.render_conversation_for_training(conv, keep)
    assert ours.text == harmony_encoding.decode(ours.ids)
    assert H.render_conversation(
        messages, o200k, for_training=False
    ).ids == harmony_encoding.render_conversation(conv, keep)
    assert H.render_conversation(messages, o200k, for_training=True, auto_drop_analysis=True).ids == (
        harmony_encoding.render_conversation_for_training(conv, drop)
    )
    assert H.render_prompt(messages, o200k) == harmony_encoding.render_conversation_for_completion(
        conv, openai_harmony.Role.ASSISTANT
    )


@settings(HYPOTHESIS, max_examples=200)
@given(params=st.one_of(parameters, schema), description=text)
def test_tool_signatures_match_openai_harmony(params, description, o200k, harmony_encoding):
    message = H.developer_message("Use the tools.", [H.ToolDescription("cargo_check", description, params)])
    expected = harmony_encoding.decode(harmony_encoding.render_conversation(to_harmony([message])))
    assert H.render_conversation([message], o200k, for_training=False).text == expected


def test_gpt_oss_style_prompt_matches_openai_harmony(o200k, harmony_encoding):
    weather = {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City"},
            "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        },
        "required": ["location"],
    }
    messages = [
        H.system_message(reasoning_effort="high", current_date="2025-08-05"),
        H.developer_message(
            "Answer in Rust.",
            [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "description": "Weather now.", "parameters": weather},
                }
            ],
        ),
        H.Message("user", "Weather in Paris?"),
        H.Message("assistant", "Need the tool.", channel="analysis"),
        H.tool_call_message("get_weather", {"location": "Paris"}),
        H.tool_result_message("get_weather", '{"temp": 20}'),
    ]
    rendered = H.render_prompt(messages, o200k)
    assert rendered == harmony_encoding.render_conversation_for_completion(
        to_harmony(messages), openai_harmony.Role.ASSISTANT
    )
    text = o200k.decode(rendered)
    assert (
        "Reasoning: high\n\n# Valid channels: analysis, commentary, final. "
        "Channel must be included for every message.\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>" in text
    )
    assert (
        'type get_weather = (_: {\n// City\nlocation: string,\nunit?: "c" | "f", // default: c\n}) => any;'
        in text
    )
    assert text.endswith(
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        '{"location": "Paris"}<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary'
        '<|message|>{"temp": 20}<|end|><|start|>assistant'
    )


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("vocabulary", ["o200k", "tiny"])
@HYPOTHESIS
@given(messages=conversation)
def test_render_then_parse_gives_the_messages(vocabulary, messages, request):
    tokenizer = request.getfixturevalue(vocabulary)
    rendered = H.render_conversation(messages, tokenizer)
    assert tokenizer.decode(rendered.ids) == rendered.text
    assert H.parse_conversation(rendered.ids, tokenizer) == [as_text_message(m, messages) for m in messages]


@HYPOTHESIS
@given(messages=conversation)
def test_parser_reads_openai_harmony_renders(messages, o200k, harmony_encoding):
    ids = harmony_encoding.render_conversation(
        to_harmony(messages), openai_harmony.RenderConversationConfig(auto_drop_analysis=False)
    )
    assert H.parse_conversation(ids, o200k) == [as_text_message(m, messages) for m in messages]


@HYPOTHESIS
@given(messages=completion)
def test_completion_parse_agrees_with_openai_harmony(messages, o200k, harmony_encoding):
    prompt = H.render_prompt([H.Message("user", "hi")], o200k)
    completion_ids = H.render_conversation([H.Message("user", "hi"), *messages], o200k).ids[len(prompt) :]
    ours = H.parse_completion(completion_ids, o200k)
    theirs = harmony_encoding.parse_messages_from_completion_tokens(
        completion_ids, openai_harmony.Role.ASSISTANT
    )
    assert ours == messages
    assert [
        (m.author.role.value, m.channel, m.recipient, m.content_type, m.content[0].text) for m in theirs
    ] == [(m.role, m.channel, m.recipient, m.content_type, m.content) for m in ours]


def test_parse_completion_from_text_with_tool_call(o200k):
    text = (
        "<|channel|>analysis<|message|>Check the crate.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.cargo_check <|constrain|>json<|message|>{"path": "."}<|call|>'
    )
    assert H.parse_completion(text, o200k) == [
        H.Message("assistant", "Check the crate.", channel="analysis"),
        H.tool_call_message("cargo_check", {"path": "."}),
    ]


garbage_piece = st.one_of(
    st.sampled_from(
        [
            H.START,
            H.END,
            H.MESSAGE,
            H.CHANNEL,
            H.CONSTRAIN,
            H.CALL,
            H.RETURN,
            "assistant",
            "final",
            " to=functions.f",
            "user",
            "functions.f",
            "{",
            "}",
            " ",
        ]
    ),
    text,
)


@HYPOTHESIS
@given(pieces=st.lists(garbage_piece, max_size=12))
def test_parser_and_validator_survive_any_token_soup(pieces, o200k):
    soup = "".join(pieces)
    problems = H.validate_completion(soup, o200k)
    assert all(isinstance(p, str) for p in problems)
    try:
        H.parse_completion(soup, o200k)
    except H.HarmonyParseError:
        assert problems  # strict parsing fails only on what the validator also reports


def test_parse_completion_accepts_a_leading_start(o200k):
    assert H.parse_completion("<|start|>assistant<|channel|>final<|message|>Hi.<|return|>", o200k) == [
        H.Message("assistant", "Hi.", channel="final")
    ]


def test_parse_completion_strict_raises_and_lenient_reads(o200k):
    broken = "<|channel|>final<|message|>Half an ans"
    with pytest.raises(H.HarmonyParseError, match="unterminated"):
        H.parse_completion(broken, o200k)
    assert H.parse_completion(broken, o200k, strict=False) == [
        H.Message("assistant", "Half an ans", channel="final")
    ]


def test_codec_works_on_tiny_tokenizer(tiny):
    messages = [
        H.system_message(),
        H.Message("user", "Write fn add."),
        H.Message("assistant", "Easy.", channel="analysis"),
        H.Message("assistant", "fn add(a: i32, b: i32) -> i32 { a + b }", channel="final"),
    ]
    rendered = H.render_conversation(messages, tiny)
    assert tiny.decode(rendered.ids) == rendered.text
    assert H.parse_conversation(rendered.ids, tiny) == [as_text_message(m, messages) for m in messages]
    assert rendered.ids[-1] == tiny.return_id


# ---------------------------------------------------------------------------------------- loss mask
def _masked_spans(rendered, tokenizer):
    spans, current = [], []
    for token, bit in zip(rendered.ids, rendered.loss_mask, strict=True):
        if bit:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


AGENT_TURN = [
    H.system_message(),
    H.developer_message("Fix the build.", [H.ToolDescription("cargo_check", "Run cargo check.")]),
    H.Message("user", "It fails."),
    H.Message("assistant", "Run check.", channel="analysis"),
    H.tool_call_message("cargo_check", {}),
    H.tool_result_message("cargo_check", "error[E0382]"),
    H.Message("assistant", "Clone it.", channel="analysis"),
    H.Message("assistant", "Add .clone().", channel="final"),
]


def test_loss_mask_covers_exactly_what_the_assistant_writes(o200k):
    rendered = H.render_conversation(AGENT_TURN, o200k)
    assert len(rendered.loss_mask) == len(rendered.ids)
    assert _masked_spans(rendered, o200k) == [
        "<|channel|>analysis<|message|>Run check.<|end|><|start|>assistant to=functions.cargo_check"
        "<|channel|>commentary <|constrain|>json<|message|>{}<|call|>",
        "<|channel|>analysis<|message|>Clone it.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Add .clone().<|return|>",
    ]


def test_loss_mask_trains_only_chosen_channels(o200k):
    rendered = H.render_conversation(AGENT_TURN, o200k, train_channels={"final"})
    # the final answer follows the model's own analysis, so its <|start|>assistant is the model's too
    assert _masked_spans(rendered, o200k) == [
        "<|start|>assistant<|channel|>final<|message|>Add .clone().<|return|>"
    ]
    first_turn_only = H.render_conversation(AGENT_TURN, o200k, train_channels={"analysis", "commentary"})
    assert _masked_spans(first_turn_only, o200k)[0].startswith("<|channel|>analysis<|message|>Run check.")


@HYPOTHESIS
@given(messages=conversation)
def test_loss_mask_is_zero_outside_assistant_messages(messages, o200k):
    rendered = H.render_conversation(messages, o200k)
    # content is encoded with special-token text kept plain, so <|start|> ids mark message starts only
    starts = [i for i, token in enumerate(rendered.ids) if token == o200k.start_id] + [len(rendered.ids)]
    assert len(starts) == len(messages) + 1
    for k, message in enumerate(messages):
        bits = rendered.loss_mask[starts[k] : starts[k + 1]]
        if message.role != "assistant":
            assert not any(bits)
            continue
        previous = messages[k - 1] if k else None
        continues = (
            previous is not None
            and previous.role == "assistant"
            and previous.channel != "final"
            and previous.recipient is None
        )
        assert bits[:2] == [int(continues)] * 2  # <|start|> and "assistant" (one o200k token)
        assert all(bits[2:])


# ---------------------------------------------------------------------------------------- validator
GOOD_FINAL = (
    "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>"
)
GOOD_CALL = (
    "<|channel|>analysis<|message|>Build it.<|end|><|start|>assistant to=functions.cargo_check"
    '<|channel|>commentary <|constrain|>json<|message|>{"path": "."}<|call|>'
)


@pytest.mark.parametrize("completion", [GOOD_FINAL, GOOD_CALL])
def test_validator_passes_good_completions(completion, o200k):
    assert H.validate_completion(completion, o200k, tool_names=["cargo_check"]) == []


def _kinds(problems):
    return {p.split(":")[0] for p in problems}


def test_validator_flags_missing_final(o200k):
    assert H.NO_FINAL in _kinds(H.validate_completion("<|channel|>analysis<|message|>Hmm.<|end|>", o200k))
    tool_call_turn = H.validate_completion(GOOD_CALL, o200k, allow_tool_call_end=False)
    assert _kinds(tool_call_turn) == {H.NO_FINAL}


def test_validator_flags_unterminated_message(o200k):
    assert H.UNTERMINATED in _kinds(H.validate_completion("<|channel|>final<|message|>Done", o200k))


def test_validator_flags_unknown_channel(o200k):
    problems = H.validate_completion(
        "<|channel|>thoughts<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>y<|return|>",
        o200k,
    )
    assert _kinds(problems) == {H.UNKNOWN_CHANNEL}
    assert H.UNKNOWN_CHANNEL in _kinds(H.validate_completion("<|message|>no channel<|return|>", o200k))


@pytest.mark.parametrize("arguments", ['{"path": ', "[1, 2]"])
def test_validator_flags_bad_tool_call_json(arguments, o200k):
    text = f"<|channel|>commentary to=functions.cargo_check <|constrain|>json<|message|>{arguments}<|call|>"
    assert _kinds(H.validate_completion(text, o200k)) == {H.BAD_TOOL_JSON}


def test_validator_flags_call_to_unknown_tool(o200k):
    assert _kinds(H.validate_completion(GOOD_CALL, o200k, tool_names=["cargo_test"])) == {H.UNKNOWN_TOOL}


def test_validator_flags_reasoning_that_never_ends(o200k):
    endless = "<|channel|>analysis<|message|>" + "Let me think again. " * 40
    problems = H.validate_completion(endless, o200k, reasoning_token_budget=100)
    assert H.ENDLESS_REASONING in _kinds(problems)
    within_budget = H.validate_completion(endless, o200k, reasoning_token_budget=1000)
    assert H.ENDLESS_REASONING not in _kinds(within_budget) and H.NO_FINAL in _kinds(within_budget)


def test_validator_flags_missing_message_token(o200k):
    problems = H.validate_completion("<|channel|>final Done.<|return|>", o200k)
    assert H.MISSING_MESSAGE_TOKEN in _kinds(problems)


def test_validator_flags_text_outside_messages(o200k):
    text = (
        "<|channel|>analysis<|message|>a<|end|>stray words"
        "<|start|>assistant<|channel|>final<|message|>b<|return|>"
    )
    assert _kinds(H.validate_completion(text, o200k)) == {H.TEXT_OUTSIDE}


def test_validator_flags_text_after_end_of_turn(o200k):
    assert _kinds(H.validate_completion(GOOD_FINAL + "more", o200k)) == {H.AFTER_END_OF_TURN}
    hallucinated_tool = (
        GOOD_CALL + "<|start|>functions.cargo_check to=assistant<|channel|>commentary<|message|>ok<|end|>"
    )
    assert H.AFTER_END_OF_TURN in _kinds(H.validate_completion(hallucinated_tool, o200k))


def test_validator_flags_other_roles(o200k):
    text = GOOD_FINAL.replace("<|return|>", "<|end|>") + "<|start|>user<|message|>thanks<|end|>"
    assert H.UNEXPECTED_ROLE in _kinds(H.validate_completion(text, o200k))


def test_validator_flags_header_tokens_inside_content(o200k):
    for text in (
        "<|channel|>final<|message|>Done<|channel|>analysis.<|return|>",
        "<|channel|>final<|message|>Done<|message|>again<|return|>",
        "<|channel|>final<|message|>Done<|endoftext|><|return|>",
    ):
        problems = H.validate_completion(text, o200k)
        assert _kinds(problems) == {H.STRAY_SPECIAL}, (text, problems)
    # special-token TEXT in content is rendered as plain text, so a good rendering passes
    rendered = H.render_conversation(
        [H.Message("assistant", "Write <|channel|> literally.", channel="final")], o200k, for_training=True
    )
    assert H.validate_completion(rendered.ids, o200k, implied_role=None) == []


@pytest.mark.parametrize(
    "text",
    [
        "<|channel|>final<|message|>Done.<|call|>",  # <|call|> but no recipient
        "<|channel|>commentary to=functions.cargo_check <|constrain|>json<|message|>{}<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Done.<|return|>",  # a tool call ended by <|end|>
        "<|channel|>analysis<|message|>Hmm.<|return|>",  # <|return|> ends only a final answer
    ],
)
def test_validator_flags_terminators_that_do_not_fit_the_message(text, o200k):
    assert H.BAD_TERMINATOR in _kinds(H.validate_completion(text, o200k))


def test_validator_passes_every_rendered_agent_turn(o200k):
    """What the renderer writes for an assistant turn (analysis <|end|>, tool call <|call|>, final
    <|return|>) is valid under the terminator and content checks."""
    for turn in (AGENT_TURN[3:5], AGENT_TURN[6:]):
        ids = H.render_conversation(list(turn), o200k, for_training=True).ids
        assert H.validate_completion(ids, o200k, tool_names=["cargo_check"], implied_role=None) == []


# ------------------------------------------------------------------------------------- data model
def test_message_rejects_bad_roles_and_content():
    with pytest.raises(ValueError, match="role"):
        H.Message("robot", "hi")
    with pytest.raises(ValueError, match="tool message"):
        H.Message("tool", "result")
    with pytest.raises(ValueError, match="SystemContent"):
        H.Message("user", H.SystemContent())
    with pytest.raises(ValueError, match="reasoning_effort"):
        H.system_message(reasoning_effort="extreme")
