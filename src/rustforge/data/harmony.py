"""Harmony chat format (gpt-oss): render conversations to token ids with a loss mask, parse completions back.

Own code rather than `openai-harmony`: that package needs its vocabulary downloaded, works only on the
o200k vocabulary (not on the tiny tokenizers the CPU pipeline uses) and gives no loss mask. The rendering
follows openai-harmony 0.0.8 token for token (the tests check this against it on generated
conversations): each header piece is tokenized on its own, special-token text inside content stays plain
text, a tool call ends with <|call|>, the last final answer of a training render ends with <|return|>,
and tool signatures are TypeScript-like types derived from JSON schemas exactly as harmony writes them.

A message on the wire:  <|start|>{role or tool name}[ to={recipient}][<|channel|>{channel}][ {content type}]
                        <|message|>{content}<|end|> | <|call|> (assistant to a recipient) | <|return|>
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rustforge.config import HARMONY_CHANNELS
from rustforge.data.tokenizer import RustforgeTokenizer

ROLES = ("system", "developer", "user", "assistant", "tool")
CHANNELS = HARMONY_CHANNELS  # defined in config.py, which validates core_agent.train_channels against it
REASONING_EFFORTS = ("low", "medium", "high")

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, CALL, RETURN = "<|constrain|>", "<|call|>", "<|return|>"
JSON_CONTENT_TYPE = "<|constrain|>json"

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
FUNCTION_TOOLS_NOTE = "Calls to these tools must go to the commentary channel: 'functions'."


# ------------------------------------------------------------------------------------------ data model
@dataclass
class ToolDescription:
    """One callable tool; `parameters` is a JSON schema (type "object") or None for no arguments."""

    name: str
    description: str
    parameters: dict | None = None


@dataclass
class ToolNamespace:
    """Tools under one name, e.g. "functions" (called as functions.NAME)."""

    name: str
    tools: list[ToolDescription] = field(default_factory=list)
    description: str | None = None


@dataclass
class SystemContent:
    """The system message as gpt-oss expects it; None fields are left out of the rendering."""

    model_identity: str | None = DEFAULT_MODEL_IDENTITY
    reasoning_effort: str | None = "medium"
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF
    current_date: str | None = None
    valid_channels: tuple[str, ...] | None = CHANNELS
    channel_required: bool = True
    tools: list[ToolNamespace] | None = None  # built-in namespaces (e.g. python); functions go to developer

    def __post_init__(self) -> None:
        if self.reasoning_effort is not None and self.reasoning_effort.lower() not in REASONING_EFFORTS:
            raise ValueError(
                f"reasoning_effort={self.reasoning_effort!r}: expected one of {REASONING_EFFORTS}"
            )


@dataclass
class DeveloperContent:
    """The developer message: instructions and the tool definitions the assistant may call."""

    instructions: str | None = None
    tools: list[ToolNamespace] | None = None


@dataclass
class Message:
    """One Harmony message. A tool result has role "tool" and name "functions.NAME"; an assistant tool
    call has channel "commentary", recipient "functions.NAME" and content_type "<|constrain|>json"."""

    role: str
    content: str | SystemContent | DeveloperContent
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"message role {self.role!r}: expected one of {ROLES}")
        if self.role == "tool" and not self.name:
            raise ValueError("a tool message needs name='functions.NAME' (the tool that answers)")
        if isinstance(self.content, SystemContent) and self.role != "system":
            raise ValueError(f"SystemContent in a {self.role} message; it belongs in a system message")
        if isinstance(self.content, DeveloperContent) and self.role != "developer":
            raise ValueError(f"DeveloperContent in a {self.role} message; it belongs in a developer message")

    @property
    def is_tool_call(self) -> bool:
        return self.role == "assistant" and self.recipient is not None


@dataclass
class Conversation:
    messages: list[Message] = field(default_factory=list)


@dataclass
class RenderedConversation:
    """text: the rendering; ids: its tokens; loss_mask[i] = 1 iff ids[i] is a token the model writes."""

    text: str
    ids: list[int]
    loss_mask: list[int]


# ------------------------------------------------------------------------------------ message helpers
def system_message(
    reasoning_effort: str = "medium",
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    current_date: str | None = None,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
    valid_channels: Sequence[str] = CHANNELS,
    channel_required: bool = True,
) -> Message:
    """gpt-oss's system message: identity, knowledge cutoff, date, reasoning effort, valid channels."""
    content = SystemContent(
        model_identity=model_identity,
        reasoning_effort=reasoning_effort,
        knowledge_cutoff=knowledge_cutoff,
        current_date=current_date,
        valid_channels=tuple(valid_channels),
        channel_required=channel_required,
    )
    return Message("system", content)


def developer_message(
    instructions: str | None = None, tools: Iterable[ToolDescription | dict] = ()
) -> Message:
    """Developer message with instructions and function tools (given as ToolDescription or as OpenAI-style
    dicts {"name", "description", "parameters"})."""
    descriptions = [_as_tool_description(tool) for tool in tools]
    namespaces = [ToolNamespace("functions", descriptions)] if descriptions else None
    return Message("developer", DeveloperContent(instructions=instructions, tools=namespaces))


def _as_tool_description(tool: ToolDescription | dict) -> ToolDescription:
    if isinstance(tool, ToolDescription):
        return tool
    spec = tool.get("function", tool)  # accept {"type": "function", "function": {...}} too
    try:
        return ToolDescription(spec["name"], spec.get("description", ""), spec.get("parameters"))
    except (KeyError, TypeError) as err:
        raise ValueError(f"tool definition {tool!r} needs at least a 'name'") from err


def tool_call_message(name: str, arguments: dict | str, channel: str = "commentary") -> Message:
    """The assistant calling functions.`name` with JSON `arguments`."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return Message(
        "assistant", text, channel=channel, recipient=f"functions.{name}", content_type=JSON_CONTENT_TYPE
    )


def tool_result_message(name: str, content: str) -> Message:
    """What functions.`name` returned, addressed back to the assistant."""
    return Message("tool", content, channel="commentary", recipient="assistant", name=f"functions.{name}")


# ------------------------------------------------------------------------ system / developer content
def render_system_content(content: SystemContent, has_function_tools: bool = False) -> str:
    sections = []
    top = [content.model_identity] if content.model_identity is not None else []
    if content.knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {content.knowledge_cutoff}")
    if content.current_date is not None:
        top.append(f"Current date: {content.current_date}")
    if top:
        sections.append("\n".join(top))
    if content.reasoning_effort is not None:
        sections.append(f"Reasoning: {content.reasoning_effort.lower()}")
    if content.tools:
        sections.append(render_tools_section(content.tools))
    if content.valid_channels:
        header = f"# Valid channels: {', '.join(content.valid_channels)}."
        if content.channel_required:
            header += " Channel must be included for every message."
        if has_function_tools:
            header += "\n" + FUNCTION_TOOLS_NOTE
        sections.append(header)
    return "\n\n".join(sections)


def render_developer_content(content: DeveloperContent) -> str:
    sections = []
    if content.instructions is not None:
        sections += ["# Instructions", content.instructions]
    if content.tools:
        sections.append(render_tools_section(content.tools))
    return "\n\n".join(sections)


def render_tools_section(namespaces: Sequence[ToolNamespace]) -> str:
    """ "# Tools" and one block per namespace, in name order (harmony keeps them in a sorted map)."""
    names = [ns.name for ns in namespaces]
    if len(set(names)) != len(names):
        raise ValueError(f"tool namespaces {names}: each name may appear once")
    blocks = ["# Tools"] + [render_tool_namespace(ns) for ns in sorted(namespaces, key=lambda ns: ns.name)]
    return "\n\n".join(blocks)


def render_tool_namespace(ns: ToolNamespace) -> str:
    lines = [f"## {ns.name}\n"]
    if ns.description is not None:
        lines += [f"// {line}" if ns.tools else line for line in _rust_lines(ns.description)]
    if ns.tools:
        lines.append(f"namespace {ns.name} {{\n")
        for tool in ns.tools:
            lines += [f"// {line}" for line in _rust_lines(tool.description)]
            if tool.parameters is not None:
                lines.append(
                    f"type {tool.name} = (_: {json_schema_to_typescript(tool.parameters)}) => any;\n"
                )
            else:
                lines.append(f"type {tool.name} = () => any;\n")
        lines.append(f"}} // namespace {ns.name}")
    return "\n".join(lines)


def _rust_lines(text: str) -> list[str]:
    """Rust's str::lines(): lines end at \\n or \\r\\n (a lone \\r is text); no empty last line."""
    *ended, last = text.split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in ended]
    return lines + [last] if last else lines


def _json_value(value) -> str:
    """serde_json's compact Display of a JSON value (what harmony prints after "default:")."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _str(schema: dict, key: str) -> str | None:
    value = schema.get(key)
    return value if isinstance(value, str) else None


def _is_enum(schema: dict) -> bool:
    return isinstance(schema.get("enum"), list) and len(schema["enum"]) > 0


def _default_comment(schema: dict, enum_default_as_json: bool = False) -> str | None:
    """The "default: ..." text: strings quoted verbatim unless the schema is an enum, then bare (or as a
    JSON string: harmony does that for the variants of a top-level oneOf); other values as JSON."""
    if "default" not in schema:
        return None
    default = schema["default"]
    if isinstance(default, str) and not _is_enum(schema):
        return f'default: "{default}"'
    if isinstance(default, str) and not enum_default_as_json:
        return f"default: {default}"
    return f"default: {_json_value(default)}"


def _with_nullable(schema: dict, type_str: str) -> str:
    if schema.get("nullable") is True and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def json_schema_to_typescript(schema, indent: str = "") -> str:
    """A JSON schema as the TypeScript-like type harmony shows the model (port of its renderer)."""
    if not isinstance(schema, dict):
        return "any"
    if isinstance(schema.get("oneOf"), list):
        return _one_of_to_typescript(schema["oneOf"], indent)
    type_value = schema.get("type")
    if isinstance(type_value, list):
        names = ["number" if t == "integer" else t for t in type_value if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(type_value, str):
        return "any"
    if type_value == "object":
        return _object_to_typescript(schema, indent)
    if type_value == "string":
        values = schema.get("enum")
        literals = [f'"{v}"' for v in values if isinstance(v, str)] if isinstance(values, list) else []
        return " | ".join(literals) if literals else "string"
    if type_value in ("number", "integer"):
        return "number"
    if type_value == "boolean":
        return "boolean"
    if type_value == "array":
        return (
            f"{json_schema_to_typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
        )
    return "any"


def _one_of_to_typescript(variants: list, indent: str) -> str:
    out = ""
    for variant in variants:
        variant = variant if isinstance(variant, dict) else {}
        out += f"\n{indent} | " + _with_nullable(variant, json_schema_to_typescript(variant, f"{indent}   "))
        comments = [
            c for c in (_str(variant, "description"), _default_comment(variant, True)) if c is not None
        ]
        if comments:
            out += f" // {' '.join(comments)}"
    return out


def _object_to_typescript(schema: dict, indent: str) -> str:
    out = ""
    description = _str(schema, "description")
    if description is not None:
        out += f"{indent}// {description}\n"
    out += "{\n"
    properties = schema.get("properties")
    if isinstance(properties, dict):
        required = schema.get("required")
        required = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
        for key, prop in properties.items():
            out += _property_to_typescript(key, prop, key in required, indent)
    return out + f"{indent}}}"


def _property_to_typescript(key: str, prop, required: bool, indent: str) -> str:
    if not isinstance(prop, dict):
        return f"{indent}{key}{'' if required else '?'}: any,\n"
    out = ""
    title = _str(prop, "title")
    if title is not None:
        out += f"{indent}// {title}\n{indent}//\n"
    one_of = prop.get("oneOf")
    description = _str(prop, "description")
    if one_of is None and description is not None:
        out += f"{indent}// {description}\n"
    examples = prop.get("examples")
    if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        out += "".join(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
    if isinstance(one_of, list):
        return out + _one_of_property_to_typescript(key, prop, one_of, required, indent)
    type_str = _with_nullable(prop, json_schema_to_typescript(prop, f"{indent}    "))
    out += f"{indent}{key}{'' if required else '?'}: {type_str},"
    if one_of is None and (default := _default_comment(prop)) is not None:
        out += f" // {default}"
    return out + "\n"


def _one_of_property_to_typescript(key: str, prop: dict, variants: list, required: bool, indent: str) -> str:
    out = ""
    description = _str(prop, "description")
    first = variants[0] if variants and isinstance(variants[0], dict) else {}
    # harmony skips the property's description when the first variant repeats it
    described_above = description is not None and description != _str(first, "description")
    if described_above:
        out += f"{indent}// {description}\n"
    if (default := _default_comment(prop)) is not None:
        out += f"{indent}// {default}\n"
    out += f"{indent}{key}{'' if required else '?'}:\n"
    for position, variant in enumerate(variants):
        variant = variant if isinstance(variant, dict) else {}
        out += f"{indent} | " + _with_nullable(variant, json_schema_to_typescript(variant, f"{indent}   "))
        comments = []
        variant_description = _str(variant, "description")
        if not (position == 0 and described_above) and variant_description is not None:
            if variant_description != description:
                comments.append(variant_description)
        if (variant_default := _default_comment(variant)) is not None:
            comments.append(variant_default)
        if comments:
            out += f" // {' '.join(comments)}"
        out += "\n"
    return out + f"{indent},\n"


# ----------------------------------------------------------------------------------------- rendering
_Segment = tuple[str, bool]  # (text, is a special token)


def _has_function_tools(messages: Sequence[Message]) -> bool:
    return any(
        isinstance(m.content, DeveloperContent)
        and any(ns.name == "functions" and ns.tools for ns in (m.content.tools or []))
        for m in messages
    )


def _content_text(message: Message, has_function_tools: bool) -> str:
    if isinstance(message.content, SystemContent):
        return render_system_content(message.content, has_function_tools)
    if isinstance(message.content, DeveloperContent):
        return render_developer_content(message.content)
    return message.content


def _author_segments(message: Message) -> list[_Segment]:
    """<|start|> and the author: the part of an assistant message that the prompt, not the model, writes."""
    if message.role == "tool":
        return [(START, True), (message.name, False)]
    author = [(START, True), (message.role, False)]
    if message.name is not None:
        author.append((f":{message.name}", False))
    return author


def _body_segments(message: Message, has_function_tools: bool) -> list[_Segment]:
    body: list[_Segment] = []
    if message.recipient is not None and message.recipient != "all":
        body.append((f" to={message.recipient}", False))
    if message.channel is not None:
        body += [(CHANNEL, True), (message.channel, False)]
    if message.content_type is not None:
        if message.content_type.startswith(CONSTRAIN):
            # <|constrain|> is a special token inside the header; the format after it is text
            body += [(" ", False), (CONSTRAIN, True)]
            if rest := message.content_type[len(CONSTRAIN) :]:
                body.append((rest, False))
        else:
            body.append((f" {message.content_type}", False))
    body += [(MESSAGE, True), (_content_text(message, has_function_tools), False)]
    body.append((CALL if message.is_tool_call else END, True))
    return body


def _encode_segments(segments: Sequence[_Segment], tokenizer: RustforgeTokenizer) -> list[int]:
    ids: list[int] = []
    for text, special in segments:
        if special:
            ids.append(tokenizer.token_to_id(text))
        else:  # each text piece on its own, special-token text kept plain -- as harmony does
            ids += tokenizer.encode(text, allow_special=False)
    return ids


def _drop_old_analysis(messages: list[Message]) -> list[Message]:
    """harmony's auto_drop_analysis: once the last assistant message is a final answer, analysis
    messages before the first final message are dropped (the reasoning of finished turns)."""
    last_assistant = next((m for m in reversed(messages) if m.role == "assistant"), None)
    if last_assistant is None or last_assistant.channel != "final":
        return messages
    first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
    if first_final is None:
        return messages
    return [m for i, m in enumerate(messages) if not (i < first_final and m.channel == "analysis")]


def _messages(conv: Conversation | Sequence[Message]) -> list[Message]:
    return list(conv.messages if isinstance(conv, Conversation) else conv)


def render_conversation(
    conv: Conversation | Sequence[Message],
    tokenizer: RustforgeTokenizer,
    for_training: bool = True,
    train_channels: Iterable[str] | None = None,
    auto_drop_analysis: bool = False,
) -> RenderedConversation:
    """Render `conv` and mark what the model must learn to write.

    loss_mask is 1 on an assistant message's header after `<|start|>assistant`, its content and its
    terminator; also on `<|start|>assistant` itself when the message follows an analysis/commentary
    message of the assistant (the model writes that continuation itself: only <|call|> and <|return|>
    stop sampling). train_channels limits training to those channels (None: every assistant message).
    for_training: as harmony's render_conversation_for_training, a conversation whose last message is an
    assistant final answer ends with <|return|> instead of <|end|>. auto_drop_analysis: harmony's option
    of that name (off here: training renders keep the reasoning).
    """
    messages = _messages(conv)
    if auto_drop_analysis:
        messages = _drop_old_analysis(messages)
    trained_channels = None if train_channels is None else set(train_channels)
    has_tools = _has_function_tools(messages)
    texts: list[str] = []
    ids: list[int] = []
    mask: list[int] = []
    previous: Message | None = None
    for message in messages:
        author, body = _author_segments(message), _body_segments(message, has_tools)
        author_ids, body_ids = _encode_segments(author, tokenizer), _encode_segments(body, tokenizer)
        trained = message.role == "assistant" and (
            trained_channels is None or message.channel in trained_channels
        )
        # after an analysis/commentary <|end|> the model itself writes the next <|start|>assistant;
        # after a tool call or a final answer the turn is over and the prompt supplies it
        continues = (
            previous is not None
            and previous.role == "assistant"
            and not previous.is_tool_call
            and previous.channel != "final"
        )
        ids += author_ids + body_ids
        mask += [int(trained and continues)] * len(author_ids) + [int(trained)] * len(body_ids)
        texts += [text for text, _ in author + body]
        previous = message
    if for_training and messages and messages[-1].role == "assistant" and messages[-1].channel == "final":
        ids[-1] = tokenizer.return_id
        texts[-1] = RETURN
    return RenderedConversation(text="".join(texts), ids=ids, loss_mask=mask)


def render_prompt(
    conv: Conversation | Sequence[Message], tokenizer: RustforgeTokenizer, auto_drop_analysis: bool = True
) -> list[int]:
    """Ids of `conv` followed by `<|start|>assistant`, ready for sampling (harmony's
    render_conversation_for_completion, which also drops the reasoning of finished turns by default)."""
    rendered = render_conversation(conv, tokenizer, for_training=False, auto_drop_analysis=auto_drop_analysis)
    return rendered.ids + [tokenizer.start_id] + tokenizer.encode("assistant", allow_special=False)


def assistant_stop_ids(tokenizer: RustforgeTokenizer) -> list[int]:
    """Tokens that end a sampling turn: a tool call or the final answer (<|end|> does not: the model
    goes on with the next message of its turn)."""
    return [tokenizer.call_id, tokenizer.return_id]


# ------------------------------------------------------------------------------------------- parsing
class HarmonyParseError(ValueError):
    """A completion is not well-formed Harmony; the message lists what is wrong."""


# Kinds of problems validate_completion reports; each problem string starts with one of these.
NO_FINAL = "no final message"
UNTERMINATED = "unterminated message"
UNKNOWN_CHANNEL = "unknown channel"
BAD_TOOL_JSON = "bad tool-call JSON"
UNKNOWN_TOOL = "unknown tool"
ENDLESS_REASONING = "reasoning never ends"
MISSING_MESSAGE_TOKEN = "missing <|message|>"
TEXT_OUTSIDE = "text outside messages"
AFTER_END_OF_TURN = "text after end of turn"
BAD_HEADER = "bad header"
UNEXPECTED_ROLE = "unexpected role"
STRAY_SPECIAL = "special token in content"
BAD_TERMINATOR = "bad terminator"


@dataclass
class ParsedMessage:
    """A message as found in token ids, with how it ended: the terminator id, or None if it did not."""

    message: Message
    terminator: int | None
    content_ids: list[int]


@dataclass
class _Scan:
    messages: list[ParsedMessage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _as_ids(text_or_ids: str | Sequence[int], tokenizer: RustforgeTokenizer) -> list[int]:
    if isinstance(text_or_ids, str):
        return tokenizer.encode(text_or_ids, allow_special=True)
    return [int(i) for i in text_or_ids]


def _parse_header(header: str, implied_role: str | None) -> tuple[Message, str | None]:
    """Header text (between <|start|> and <|message|>) -> empty Message with its fields; and a problem."""
    channel = None
    if (at := header.find(CHANNEL)) >= 0:
        after = header[at + len(CHANNEL) :]
        stop = next((i for i, c in enumerate(after) if c.isspace() or c == "<"), len(after))
        channel = after[:stop] or None
        header = header[:at] + after[stop:]
        if channel is None:
            return Message(implied_role or "assistant", ""), "channel marker without a channel name"
    parts = header.replace(CONSTRAIN, f" {CONSTRAIN}").split()
    role, name = implied_role, None
    if role is None:
        if not parts:
            return Message("assistant", "", channel=channel), "no role"
        author = parts.pop(0)
        role, _, name = author.partition(":")
        if role not in ROLES:  # a tool's name such as functions.cargo_check stands for the role
            role, name = "tool", author
        name = name or None
    recipient = content_type = None
    if parts and not parts[-1].startswith("to="):
        content_type = parts.pop()
    if parts and parts[-1].startswith("to="):
        recipient = parts.pop()[len("to=") :]
    problem = f"unexpected {' '.join(parts)!r}" if parts else None
    if role == "tool" and not name:
        return Message("assistant", "", channel=channel), "tool message without a tool name"
    message = Message(role, "", channel=channel, recipient=recipient, content_type=content_type, name=name)
    return message, problem


def _scan(
    ids: list[int], tokenizer: RustforgeTokenizer, implied_role: str | None, one_turn: bool = True
) -> _Scan:
    """Split ids into messages. A completion starts inside a header whose role is `implied_role` (the
    prompt ended with <|start|>assistant) unless it opens with <|start|> itself. one_turn: anything
    after a <|call|> or <|return|> is a problem (sampling stops there)."""
    scan = _Scan()
    turn_enders = {tokenizer.call_id, tokenizer.return_id}
    position, turn_ended = 0, False
    role = implied_role if ids[:1] != [tokenizer.start_id] else None
    in_message = role is not None
    while position < len(ids):
        if not in_message:  # expect <|start|>; anything before it is stray
            start = _index_of(ids, {tokenizer.start_id}, position)
            if start > position:
                kind = AFTER_END_OF_TURN if turn_ended else TEXT_OUTSIDE
                scan.problems.append(f"{kind}: {tokenizer.decode(ids[position:start])[:80]!r}")
            if start == len(ids):
                break
            if turn_ended:
                scan.problems.append(f"{AFTER_END_OF_TURN}: a message follows <|call|>/<|return|>")
            position, role = start + 1, None
        parsed, position = _read_message(
            ids, position, role, tokenizer, len(scan.messages) + 1, scan.problems
        )
        scan.messages.append(parsed)
        in_message = False
        turn_ended = one_turn and (turn_ended or parsed.terminator in turn_enders)
    return scan


def _read_message(
    ids: list[int],
    position: int,
    role: str | None,
    tokenizer: RustforgeTokenizer,
    number: int,
    problems: list[str],
) -> tuple[ParsedMessage, int]:
    """Read the message whose header starts at `position`; returns it and where the next one starts."""
    stops = {tokenizer.end_id, tokenizer.call_id, tokenizer.return_id}
    header_end = _index_of(ids, stops | {tokenizer.message_id, tokenizer.start_id}, position)
    header_text = tokenizer.decode(ids[position:header_end])
    message, header_problem = _parse_header(header_text, role)
    if header_problem:
        problems.append(f"{BAD_HEADER}: message {number}: {header_problem} in {header_text!r}")
    if header_end == len(ids) or ids[header_end] != tokenizer.message_id:
        problems.append(f"{MISSING_MESSAGE_TOKEN}: message {number} header {header_text!r}")
        ended_by = ids[header_end] if header_end < len(ids) and ids[header_end] in stops else None
        return ParsedMessage(message, ended_by, []), header_end + (ended_by is not None)
    content_end = _index_of(ids, stops | {tokenizer.start_id}, header_end + 1)
    content_ids = ids[header_end + 1 : content_end]
    message.content = tokenizer.decode(content_ids)
    terminator = ids[content_end] if content_end < len(ids) and ids[content_end] in stops else None
    if terminator is None:
        what = message.channel or message.role
        problems.append(f"{UNTERMINATED}: message {number} ({what}) has no <|end|>, <|call|> or <|return|>")
    return ParsedMessage(message, terminator, content_ids), content_end + (terminator is not None)


def _index_of(ids: list[int], targets: set[int], start: int) -> int:
    return next((i for i in range(start, len(ids)) if ids[i] in targets), len(ids))


def parse_messages(
    text_or_ids: str | Sequence[int],
    tokenizer: RustforgeTokenizer,
    implied_role: str | None = "assistant",
) -> list[ParsedMessage]:
    """Messages of a completion with how each ended; lenient (see validate_completion for problems)."""
    return _scan(_as_ids(text_or_ids, tokenizer), tokenizer, implied_role).messages


def parse_completion(
    text_or_ids: str | Sequence[int],
    tokenizer: RustforgeTokenizer,
    implied_role: str | None = "assistant",
    strict: bool = True,
) -> list[Message]:
    """Messages of a sampled completion: what follows `<|start|>assistant` (implied_role="assistant"), or
    a whole rendering starting with <|start|> (implied_role=None).

    Pass ids rather than text when content may contain special-token text: text is re-encoded with
    special tokens recognised. strict: raise HarmonyParseError on malformed structure (unterminated
    message, header without <|message|>, stray text); otherwise return what could be read.
    """
    scan = _scan(_as_ids(text_or_ids, tokenizer), tokenizer, implied_role)
    if strict and scan.problems:
        raise HarmonyParseError("; ".join(scan.problems))
    return [parsed.message for parsed in scan.messages]


def parse_conversation(
    ids: Sequence[int], tokenizer: RustforgeTokenizer, strict: bool = True
) -> list[Message]:
    """Messages of a whole rendering (each opening with <|start|>, several turns allowed)."""
    scan = _scan([int(i) for i in ids], tokenizer, implied_role=None, one_turn=False)
    if strict and scan.problems:
        raise HarmonyParseError("; ".join(scan.problems))
    return [parsed.message for parsed in scan.messages]


def validate_completion(
    text_or_ids: str | Sequence[int],
    tokenizer: RustforgeTokenizer,
    valid_channels: Sequence[str] = CHANNELS,
    reasoning_token_budget: int = 4096,
    allow_tool_call_end: bool = True,
    tool_names: Iterable[str] | None = None,
    implied_role: str | None = "assistant",
) -> list[str]:
    """Problems of a sampled assistant turn ([] when it is good). Each problem starts with its kind:
    NO_FINAL, UNTERMINATED, UNKNOWN_CHANNEL, BAD_TOOL_JSON, UNKNOWN_TOOL, ENDLESS_REASONING,
    MISSING_MESSAGE_TOKEN, TEXT_OUTSIDE, AFTER_END_OF_TURN, BAD_HEADER, UNEXPECTED_ROLE, STRAY_SPECIAL,
    BAD_TERMINATOR.

    A turn is good when every message is an assistant message on a valid channel whose content holds no
    header token (<|channel|>, <|message|>, <|constrain|>, ...) and whose terminator fits it (<|call|> ends
    a tool call and only a tool call, <|return|> only a final answer), it ends with a final answer
    (<|return|> or <|end|>) or -- if allow_tool_call_end -- with a tool call whose arguments are a JSON
    object (to one of tool_names, when given), and nothing follows its end.
    """
    ids = _as_ids(text_or_ids, tokenizer)
    scan = _scan(ids, tokenizer, implied_role)
    problems = list(scan.problems)
    known_tools = (
        None if tool_names is None else {f"functions.{n}" if "." not in n else n for n in tool_names}
    )
    header_only = _header_only_ids(tokenizer)
    for number, parsed in enumerate(scan.messages, start=1):
        problems += _message_problems(number, parsed.message, valid_channels, known_tools)
        problems += _structure_problems(number, parsed, tokenizer, header_only)
    finals = [p for p in scan.messages if p.message.channel == "final" and p.message.role == "assistant"]
    ends_in_call = bool(scan.messages) and scan.messages[-1].terminator == tokenizer.call_id
    if not finals and not (allow_tool_call_end and ends_in_call):
        problems.append(f"{NO_FINAL}: the turn ends without a final-channel answer")
        reasoning = sum(len(p.content_ids) for p in scan.messages if p.message.channel == "analysis")
        if reasoning > reasoning_token_budget:
            budget = reasoning_token_budget
            problems.append(f"{ENDLESS_REASONING}: {reasoning} analysis tokens (budget {budget}), no answer")
    return problems


def _header_only_ids(tokenizer: RustforgeTokenizer) -> set[int]:
    """Special tokens that belong in headers or outside messages, never inside a message's content."""
    return {tokenizer.channel_id, tokenizer.message_id, tokenizer.constrain_id, tokenizer.startoftext_id,
            tokenizer.endoftext_id, tokenizer.endofprompt_id}  # fmt: skip


def _structure_problems(
    number: int, parsed: ParsedMessage, tokenizer: RustforgeTokenizer, header_only: set[int]
) -> list[str]:
    """What the parser reads leniently: header tokens inside content, and a terminator that does not fit the
    message (text content never holds a special token: the renderer encodes special-token text as text)."""
    problems = []
    stray = sorted({tokenizer.id_to_token(i) for i in parsed.content_ids if i in header_only})
    if stray:
        problems.append(f"{STRAY_SPECIAL}: message {number} content holds {', '.join(stray)}")
    message, terminator = parsed.message, parsed.terminator
    calls = message.recipient is not None
    if terminator == tokenizer.call_id and not calls:
        problems.append(f"{BAD_TERMINATOR}: message {number} ends with <|call|> but calls no tool")
    elif terminator == tokenizer.end_id and calls:
        problems.append(f"{BAD_TERMINATOR}: tool call {number} ends with <|end|>, not <|call|>")
    elif terminator == tokenizer.return_id and message.channel != "final":
        problems.append(f"{BAD_TERMINATOR}: message {number} ({message.channel}) ends with <|return|>")
    return problems


def _message_problems(
    number: int, message: Message, valid_channels: Sequence[str], known_tools: set[str] | None
) -> list[str]:
    problems = []
    if message.role != "assistant":
        problems.append(f"{UNEXPECTED_ROLE}: message {number} is from {message.name or message.role}")
    if message.channel not in valid_channels:
        expected = tuple(valid_channels)
        problems.append(
            f"{UNKNOWN_CHANNEL}: message {number} has channel {message.channel!r}, not one of {expected}"
        )
    if message.is_tool_call:
        if known_tools is not None and message.recipient not in known_tools:
            problems.append(f"{UNKNOWN_TOOL}: message {number} calls {message.recipient!r}")
        try:
            arguments = json.loads(message.content)
        except json.JSONDecodeError as err:
            problems.append(f"{BAD_TOOL_JSON}: message {number} to {message.recipient}: {err}")
        else:
            if not isinstance(arguments, dict):
                problems.append(
                    f"{BAD_TOOL_JSON}: message {number} to {message.recipient}: not a JSON object"
                )
    return problems


__all__ = [
    "AFTER_END_OF_TURN",
    "BAD_HEADER",
    "BAD_TERMINATOR",
    "BAD_TOOL_JSON",
    "ENDLESS_REASONING",
    "MISSING_MESSAGE_TOKEN",
    "NO_FINAL",
    "STRAY_SPECIAL",
    "TEXT_OUTSIDE",
    "UNEXPECTED_ROLE",
    "UNKNOWN_CHANNEL",
    "UNKNOWN_TOOL",
    "UNTERMINATED",
    "CHANNELS",
    "ROLES",
    "Conversation",
    "DeveloperContent",
    "HarmonyParseError",
    "Message",
    "ParsedMessage",
    "RenderedConversation",
    "SystemContent",
    "ToolDescription",
    "ToolNamespace",
    "assistant_stop_ids",
    "developer_message",
    "json_schema_to_typescript",
    "parse_completion",
    "parse_conversation",
    "parse_messages",
    "render_conversation",
    "render_developer_content",
    "render_prompt",
    "render_system_content",
    "system_message",
    "tool_call_message",
    "tool_result_message",
    "validate_completion",
]
