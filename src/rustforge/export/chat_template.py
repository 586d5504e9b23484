"""The Harmony chat template written into exports (chat_template.jinja), for transformers' apply_chat_template,
vLLM and other servers that render OpenAI-format messages through the tokenizer's template.

Own template, not a copy of the one gpt-oss ships: it renders exactly what rustforge trains on, i.e.
`rustforge.rust.trajectories.openai_to_conversation` followed by `rustforge.data.harmony` (tests check text
equality on chats with tools, reasoning and tool calls):
- a system message with gpt-oss's defaults (identity, knowledge cutoff, `reasoning_effort` kwarg, default
  "medium", valid channels); system/developer messages become the developer message's "# Instructions",
  `tools` its "# Tools" section (JSON schemas as harmony's TypeScript-like types);
- assistant `reasoning_content` (or `thinking` / `reasoning`) -> analysis channel, `content` -> final (or
  commentary when the message also calls tools), each tool call -> `to=functions.NAME` commentary
  `<|constrain|>json` ending in <|call|>; tool results -> `functions.NAME to=assistant` (name from the
  matching tool_call_id, else `name`, else the last call);
- add_generation_prompt=True renders a prompt (earlier turns' reasoning dropped, as harmony's
  render_conversation_for_completion) ending in `<|start|>assistant`; without it a conversation ending in
  an assistant answer ends with <|return|> (the training rendering).
Tool-call arguments given as a JSON string are written verbatim (a template cannot re-serialise them);
give them as objects to get exactly the training rendering.
"""

CHAT_TEMPLATE = r"""
{#- rustforge Harmony chat template (rustforge.export.chat_template) -#}
{%- macro text_of(content) -%}
{%- if content is none -%}
{%- elif content is string -%}{{ content }}
{%- else -%}{%- for part in content -%}{{ part.text }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}

{%- macro default_comment(schema, enum_default_as_json) -%}
{%- if "default" in schema -%}
{%- set value = schema["default"] -%}
{%- set is_enum = schema.get("enum") is iterable and schema.get("enum") is not string and schema.get("enum") is not mapping and schema.get("enum") | length > 0 -%}
{%- if value is string and not is_enum -%}default: "{{ value }}"
{%- elif value is string and not enum_default_as_json -%}default: {{ value }}
{%- else -%}default: {{ value | tojson(separators=(",", ":")) }}
{%- endif -%}
{%- endif -%}
{%- endmacro -%}

{%- macro with_nullable(schema, type_str) -%}
{{ type_str }}{%- if schema.get("nullable") is sameas true and "null" not in type_str %} | null{% endif -%}
{%- endmacro -%}

{%- macro one_of(variants, indent) -%}
{%- for raw in variants -%}
{%- set variant = raw if raw is mapping else {} -%}
{{ "\n" ~ indent ~ " | " ~ with_nullable(variant, ts_type(variant, indent ~ "   ")) }}
{%- set comments = [] -%}
{%- if variant.get("description") is string -%}{%- set comments = comments + [variant["description"]] -%}{%- endif -%}
{%- set dc = default_comment(variant, true) -%}
{%- if dc -%}{%- set comments = comments + [dc] -%}{%- endif -%}
{%- if comments -%}{{ " // " ~ comments | join(" ") }}{%- endif -%}
{%- endfor -%}
{%- endmacro -%}

{%- macro one_of_property(key, prop, variants, required, indent) -%}
{%- set description = prop.get("description") if prop.get("description") is string else none -%}
{%- set first = variants[0] if variants and variants[0] is mapping else {} -%}
{%- set first_description = first.get("description") if first.get("description") is string else none -%}
{%- set described_above = description is not none and description != first_description -%}
{%- if described_above -%}{{ indent ~ "// " ~ description ~ "\n" }}{%- endif -%}
{%- set dc = default_comment(prop, false) -%}
{%- if dc -%}{{ indent ~ "// " ~ dc ~ "\n" }}{%- endif -%}
{{ indent ~ key ~ ("" if required else "?") ~ ":\n" }}
{%- for raw in variants -%}
{%- set variant = raw if raw is mapping else {} -%}
{{ indent ~ " | " ~ with_nullable(variant, ts_type(variant, indent ~ "   ")) }}
{%- set comments = [] -%}
{%- set vd = variant.get("description") if variant.get("description") is string else none -%}
{%- if not (loop.first and described_above) and vd is not none and vd != description -%}{%- set comments = comments + [vd] -%}{%- endif -%}
{%- set vdc = default_comment(variant, false) -%}
{%- if vdc -%}{%- set comments = comments + [vdc] -%}{%- endif -%}
{%- if comments -%}{{ " // " ~ comments | join(" ") }}{%- endif -%}
{{ "\n" }}
{%- endfor -%}
{{ indent ~ ",\n" }}
{%- endmacro -%}

{%- macro property(key, prop, required, indent) -%}
{%- if prop is not mapping -%}{{ indent ~ key ~ ("" if required else "?") ~ ": any,\n" }}
{%- else -%}
{%- if prop.get("title") is string -%}{{ indent ~ "// " ~ prop["title"] ~ "\n" ~ indent ~ "//\n" }}{%- endif -%}
{%- set variants = prop.get("oneOf") -%}
{%- if variants is none and prop.get("description") is string -%}{{ indent ~ "// " ~ prop["description"] ~ "\n" }}{%- endif -%}
{%- set examples = prop.get("examples") -%}
{%- if examples is iterable and examples is not string and examples is not mapping and examples | length > 0 -%}
{{ indent ~ "// Examples:\n" }}
{%- for example in examples if example is string -%}{{ indent ~ "// - \"" ~ example ~ "\"\n" }}{%- endfor -%}
{%- endif -%}
{%- if variants is iterable and variants is not string and variants is not mapping -%}{{ one_of_property(key, prop, variants, required, indent) }}
{%- else -%}
{{ indent ~ key ~ ("" if required else "?") ~ ": " ~ with_nullable(prop, ts_type(prop, indent ~ "    ")) ~ "," }}
{%- set dc = default_comment(prop, false) -%}
{%- if variants is none and dc -%}{{ " // " ~ dc }}{%- endif -%}
{{ "\n" }}
{%- endif -%}
{%- endif -%}
{%- endmacro -%}

{%- macro ts_type(schema, indent) -%}
{%- if schema is not mapping -%}any
{%- elif schema.get("oneOf") is iterable and schema.get("oneOf") is not string and schema.get("oneOf") is not mapping -%}{{ one_of(schema["oneOf"], indent) }}
{%- else -%}
{%- set type_value = schema.get("type") -%}
{%- if type_value is iterable and type_value is not string and type_value is not mapping and type_value | select("string") | list | length > 0 -%}
{%- for t in type_value if t is string -%}{{ " | " if not loop.first }}{{ "number" if t == "integer" else t }}{%- endfor -%}
{%- elif type_value is not string -%}any
{%- elif type_value == "object" -%}
{%- if schema.get("description") is string -%}{{ indent ~ "// " ~ schema["description"] ~ "\n" }}{%- endif -%}
{{ "{\n" }}
{%- set properties = schema.get("properties") -%}
{%- if properties is mapping -%}
{%- set required = schema.get("required") if (schema.get("required") is iterable and schema.get("required") is not string and schema.get("required") is not mapping) else [] -%}
{%- for key, prop in properties.items() -%}{{ property(key, prop, key in required, indent) }}{%- endfor -%}
{%- endif -%}
{{ indent ~ "}" }}
{%- elif type_value == "string" -%}
{%- set values = schema.get("enum") -%}
{%- if values is iterable and values is not string and values is not mapping and values | select("string") | list | length > 0 -%}
{%- for v in values if v is string -%}{{ " | " if not loop.first }}"{{ v }}"{%- endfor -%}
{%- else -%}string
{%- endif -%}
{%- elif type_value in ("number", "integer") -%}number
{%- elif type_value == "boolean" -%}boolean
{%- elif type_value == "array" -%}
{%- if "items" in schema -%}{{ ts_type(schema["items"], indent) ~ "[]" }}{%- else -%}Array<any>{%- endif -%}
{%- else -%}any
{%- endif -%}
{%- endif -%}
{%- endmacro -%}

{%- macro rust_lines_comment(text) -%}
{%- set lines = text.split("\n") -%}
{%- for line in lines -%}
{%- if not (loop.last and line == "") -%}
{{ "// " ~ (line[:-1] if (not loop.last and line.endswith("\r")) else line) ~ "\n" }}
{%- endif -%}
{%- endfor -%}
{%- endmacro -%}

{%- macro functions_namespace(tools) -%}
{{ "## functions\n\nnamespace functions {\n\n" }}
{%- for raw in tools -%}
{%- set tool = raw.function if raw.function is defined else raw -%}
{{ rust_lines_comment(tool.description if tool.description is defined and tool.description is not none else "") }}
{%- if tool.parameters is defined and tool.parameters is not none -%}
{{ "type " ~ tool.name ~ " = (_: " ~ ts_type(tool.parameters, "") ~ ") => any;\n\n" }}
{%- else -%}
{{ "type " ~ tool.name ~ " = () => any;\n\n" }}
{%- endif -%}
{%- endfor -%}
{{ "} // namespace functions" }}
{%- endmacro -%}

{#- ---------------------------------------------------------------- preamble -#}
{%- set has_tools = tools is defined and tools is not none and tools | length > 0 -%}
{%- set effort = (reasoning_effort if reasoning_effort is defined and reasoning_effort is not none else "medium") | lower -%}
{{- "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n\nReasoning: " ~ effort ~ "\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message." -}}
{%- if has_tools -%}{{- "\nCalls to these tools must go to the commentary channel: 'functions'." -}}{%- endif -%}
{{- "<|end|>" -}}
{%- set collected = namespace(texts=[]) -%}
{%- for message in messages if message.role in ("system", "developer") -%}
{%- set collected.texts = collected.texts + [text_of(message.content) | string] -%}
{%- endfor -%}
{%- set instruction_text = collected.texts | join("\n\n") -%}
{%- if instruction_text or has_tools -%}
{{- "<|start|>developer<|message|>" -}}
{%- if instruction_text -%}{{- "# Instructions\n\n" ~ instruction_text -}}{%- endif -%}
{%- if instruction_text and has_tools -%}{{- "\n\n" -}}{%- endif -%}
{%- if has_tools -%}{{- "# Tools\n\n" ~ functions_namespace(tools) -}}{%- endif -%}
{{- "<|end|>" -}}
{%- endif -%}

{#- -------------------------------------------- which reasoning a prompt drops -#}
{%- set state = namespace(first_final=-1, last_is_final=false, last_call=none) -%}
{%- for message in messages if message.role == "assistant" -%}
{%- set final = text_of(message.content) != "" and not message.tool_calls -%}
{%- if final and state.first_final < 0 -%}{%- set state.first_final = loop.index0 -%}{%- endif -%}
{%- set state.last_is_final = final -%}
{%- endfor -%}
{%- set drop_reasoning_upto = state.first_final if (add_generation_prompt and state.last_is_final) else -1 -%}

{#- ---------------------------------------------------------------- messages -#}
{%- set counter = namespace(assistant=-1) -%}
{%- for message in messages -%}
{%- if message.role == "user" -%}
{{- "<|start|>user<|message|>" ~ text_of(message.content) ~ "<|end|>" -}}
{%- elif message.role == "assistant" -%}
{%- set counter.assistant = counter.assistant + 1 -%}
{%- set reasoning = message.reasoning_content if message.reasoning_content is defined else (message.thinking if message.thinking is defined else message.reasoning) -%}
{%- set reasoning = text_of(reasoning) if reasoning is defined else "" -%}
{%- set content = text_of(message.content) -%}
{%- set calls = message.tool_calls if message.tool_calls else [] -%}
{%- if reasoning and counter.assistant > drop_reasoning_upto -%}
{{- "<|start|>assistant<|channel|>analysis<|message|>" ~ reasoning ~ "<|end|>" -}}
{%- endif -%}
{%- if content -%}
{%- set closing = "<|return|>" if (loop.last and not calls and not add_generation_prompt) else "<|end|>" -%}
{{- "<|start|>assistant<|channel|>" ~ ("commentary" if calls else "final") ~ "<|message|>" ~ content ~ closing -}}
{%- endif -%}
{%- for call in calls -%}
{%- set arguments = call.function.arguments if call.function.arguments is defined else "{}" -%}
{{- "<|start|>assistant to=functions." ~ call.function.name ~ "<|channel|>commentary <|constrain|>json<|message|>" -}}
{{- arguments if arguments is string else arguments | tojson -}}
{{- "<|call|>" -}}
{%- endfor -%}
{%- set state.last_call = calls[-1].function.name if calls else none -%}
{%- elif message.role == "tool" -%}
{%- set found = namespace(name=none) -%}
{%- if message.tool_call_id is defined and message.tool_call_id is not none -%}
{%- for earlier in messages[:loop.index0] if earlier.role == "assistant" and earlier.tool_calls -%}
{%- for call in earlier.tool_calls if call.id is defined and (call.id | string) == (message.tool_call_id | string) -%}
{%- set found.name = call.function.name -%}
{%- endfor -%}
{%- endfor -%}
{%- elif message.name is defined and message.name is not none -%}
{%- set found.name = message.name -%}
{%- else -%}
{%- set found.name = state.last_call -%}
{%- endif -%}
{%- if found.name is none -%}{{- raise_exception("a tool message needs tool_call_id or name") -}}{%- endif -%}
{{- "<|start|>functions." ~ found.name ~ " to=assistant<|channel|>commentary<|message|>" ~ text_of(message.content) ~ "<|end|>" -}}
{%- elif message.role not in ("system", "developer") -%}
{{- raise_exception("unknown role " ~ message.role) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|start|>assistant" -}}{%- endif -%}
""".strip()
