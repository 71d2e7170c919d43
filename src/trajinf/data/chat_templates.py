"""Tool-call-aware jinja chat templates (for locally trained tokenizers, and for pretrained
models whose own template drops tool calls: ``--chat-template chatml-tools``).

Both templates are *prefix-stable*: rendering ``messages[:i]`` is always a string prefix of
rendering ``messages[:i+1]`` (every message renders to its own block, independent of the
messages after it), which is what :mod:`trajinf.data.tokenize` needs to find message boundaries.
Tool-call arguments are written verbatim when they are a JSON string (the OpenAI form) and
serialized with ``tojson`` when they are a mapping.

- ``CHATML_TOOL_TEMPLATE``: Qwen2.5 style. Tools go in the system block, an assistant tool call is
  ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``, and each tool result is its own
  ``<|im_start|>user\\n<tool_response>\\n...\\n</tool_response><|im_end|>`` block (Qwen2.5 merges
  consecutive tool results into one block, which is not prefix-stable). End of turn: ``<|im_end|>``.
- ``LLAMA3_TOOL_TEMPLATE``: Llama 3.1 style. ``<|begin_of_text|>``, headers
  ``<|start_header_id|>role<|end_header_id|>\\n\\n``, tools in the system block, tool calls as
  ``{"name": ..., "parameters": ...}``, tool results under the ``ipython`` role. End of turn:
  ``<|eot_id|>``.
"""

from __future__ import annotations

from pathlib import Path

from trajinf.errors import TrajinfError

CHATML_TOOL_TEMPLATE = (
    "{%- set ns = namespace(start=0) %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' %}"
    "{{- messages[0].content + '\\n\\n' }}"
    "{%- set ns.start = 1 %}"
    "{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- endif %}"
    "{%- for message in messages[ns.start:] %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- if message.tool_calls %}"
    "{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": ' }}{{- fn.name | tojson }}{{- ', \"arguments\": ' }}"
    "{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}"
    "{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content "
    "+ '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TOOL_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- set ns = namespace(start=0) %}"
    "{%- if messages and messages[0].role == 'system' %}{%- set ns.start = 1 %}{%- endif %}"
    "{%- if ns.start == 1 or tools %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if ns.start == 1 %}{{- messages[0].content }}{%- endif %}"
    "{%- if tools %}"
    "{%- if ns.start == 1 %}{{- '\\n\\n' }}{%- endif %}"
    "{{- 'You have access to the following functions. To call a function, respond with JSON of "
    'the form {"name": function name, "parameters": dictionary of argument name and its '
    "value}.\\n' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages[ns.start:] %}"
    "{%- set role = 'ipython' if message.role == 'tool' else message.role %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}"
    "{%- if message.role == 'assistant' %}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- if message.tool_calls %}"
    "{%- for call in message.tool_calls %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '{\"name\": ' }}{{- fn.name | tojson }}{{- ', \"parameters\": ' }}"
    "{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}"
    "{%- endif %}"
    "{{- '}' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{%- else %}"
    "{{- message.content }}"
    "{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

#: End-of-turn marker of each template (the token the model must learn to emit to stop).
END_OF_TURN = {CHATML_TOOL_TEMPLATE: "<|im_end|>", LLAMA3_TOOL_TEMPLATE: "<|eot_id|>"}

#: ``--chat-template`` names.
CHAT_TEMPLATES = {"chatml-tools": CHATML_TOOL_TEMPLATE, "llama3-tools": LLAMA3_TOOL_TEMPLATE}


def resolve_chat_template(spec: str) -> str:
    """Jinja text of a ``--chat-template`` value: a name from :data:`CHAT_TEMPLATES` or the path
    of a Jinja file (a one-line TrajinfError when it is neither)."""
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        text = path.read_text()
        if not text.strip():
            raise TrajinfError(f"{path}: empty chat template file")
        return text
    raise TrajinfError(
        f"--chat-template {spec!r}: not one of {', '.join(CHAT_TEMPLATES)} and no such Jinja file"
    )
