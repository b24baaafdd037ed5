#!/usr/bin/env python3
"""Golden prompts for the `chat` crate, rendered with Python jinja2.

Reads `tokenizer.chat_template` and the BOS/EOS token texts from a deepseek4 GGUF (default
models/tiny-ds4.gguf), writes the template to chat/tests/data/ds4-template.jinja and renders every
case below the way HF transformers' `apply_chat_template` does (ImmutableSandboxedEnvironment with
trim_blocks/lstrip_blocks and loopcontrols, `tojson` = json.dumps(ensure_ascii=False),
`raise_exception`, `strftime_now`), plus the `from_json` filter the llama.cpp template needs.
Request-level normalisation mirrors what OpenAI-compatible servers (vLLM, llama.cpp) do before
rendering: content given as a list of text parts is joined with "\n".
Output: chat/tests/data/golden.json (cases with their template variables and expected prompt, and
`expected_neutral`: the render after mapping every request string through `neutral`, which checks
how the Rust renderer splits its output into template and content pieces).
"""
import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import gguf
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "chat" / "tests" / "data"


def read_gguf(path):
    r = gguf.GGUFReader(str(path))

    def field_str(f, i=0):
        return bytes(f.parts[f.data[i]]).decode("utf-8")

    tmpl = field_str(r.fields["tokenizer.chat_template"])
    tokens = r.fields["tokenizer.ggml.tokens"]
    bos_id = int(r.fields["tokenizer.ggml.bos_token_id"].parts[-1][0])
    eos_id = int(r.fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
    return tmpl, field_str(tokens, bos_id), field_str(tokens, eos_id)


def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters["from_json"] = json.loads
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def neutral(x, key=None):
    """Maps every request string except the structural `role`/`type` fields (and dict keys) through
    "<" -> "[" and ">" -> "]"; the Rust test applies the same map to Content pieces only and must get this render."""
    if isinstance(x, str):
        return x if key in ("role", "type") else x.replace("<", "[").replace(">", "]")
    if isinstance(x, list):
        return [neutral(v) for v in x]
    if isinstance(x, dict):
        return {k: neutral(v, k) for k, v in x.items()}
    return x


def normalize(messages):
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        out.append(m)
    return out


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city. Returns <temp> & \"conditions\"; ° units.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "units": {"type": "string", "enum": ["metric", "imperial"]},
            },
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "description": "Current time.",
                                          "parameters": {"type": "object", "properties": {}}}}
SPECIAL = "<｜end▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>"
READ = {"type": "function", "function": {"name": "read_file", "description": "Read a file.",
                                         "parameters": {"type": "object", "properties": {
                                             "path": {"type": "string"}}, "required": ["path"]}}}
EDIT = {"type": "function", "function": {"name": "edit", "description": "Replace text in a file.",
                                         "parameters": {"type": "object", "properties": {
                                             "path": {"type": "string"}, "old": {"type": "string"},
                                             "new": {"type": "string"}, "count": {"type": "integer"},
                                             "options": {"type": "object"}}}}}
AGENT_LOOP = [
    {"role": "system", "content": "You are a coding agent."},
    {"role": "user", "content": "Fix the typo in src/main.rs."},
    {"role": "assistant", "content": None, "reasoning_content": "Read the file first.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "read_file",
                                                         "arguments": "{\"path\": \"src/main.rs\"}"}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "fn main() {\n    println!(\"helo\");\n}\n"},
    {"role": "assistant", "content": "Found it: \"helo\".", "reasoning_content": "Edit, then check the time.",
     "tool_calls": [
        {"id": "call_b", "type": "function", "function": {"name": "edit", "arguments": (
            "{\"path\": \"src/main.rs\", \"old\": \"println!(\\\"helo\\\");\", \"new\": \"println!(\\\"hello\\\");\\n\", "
            "\"count\": 1, \"options\": {\"dry_run\": false, \"ratio\": 0.25, \"tags\": [\"ü\", null], \"note\": \"a <b> & c\"}}")}},
        {"id": "call_c", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_b", "content": "ok"},
    {"role": "tool", "tool_call_id": "call_c", "content": "2025-01-01T12:00:00Z"},
    {"role": "assistant", "content": "Fixed the typo.", "reasoning_content": "Done."},
    {"role": "user", "content": "Thanks!"},
]

CASES = [
    ("single_turn", [{"role": "user", "content": "Hello!"}], None, {"add_generation_prompt": True}),
    ("single_turn_thinking", [{"role": "user", "content": "Hello!"}], None,
     {"add_generation_prompt": True, "thinking": True}),
    ("single_turn_enable_thinking", [{"role": "user", "content": "Hello!"}], None,
     {"add_generation_prompt": True, "enable_thinking": True}),
    ("single_turn_no_generation_prompt", [{"role": "user", "content": "Hello!"}], None,
     {"add_generation_prompt": False}),
    ("system_and_user", [{"role": "system", "content": "You are terse."},
                         {"role": "user", "content": "Name a prime."}], None,
     {"add_generation_prompt": True, "thinking": False}),
    ("system_only", [{"role": "system", "content": "You are terse."}], None,
     {"add_generation_prompt": True}),
    ("system_only_thinking", [{"role": "system", "content": "You are terse."}], None,
     {"add_generation_prompt": True, "thinking": True}),
    ("multi_turn_reasoning_thinking", [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2 is 4."},
        {"role": "user", "content": "And 3+3?"},
    ], None, {"add_generation_prompt": True, "thinking": True}),
    ("multi_turn_reasoning_no_thinking", [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2 is 4."},
        {"role": "user", "content": "And 3+3?"},
    ], None, {"add_generation_prompt": True, "thinking": False}),
    ("last_assistant_keeps_reasoning", [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2 is 4."},
    ], None, {"add_generation_prompt": False, "thinking": True}),
    ("multiple_system_consecutive_users", [
        {"role": "system", "content": "Rule one."},
        {"role": "system", "content": "Rule two."},
        {"role": "user", "content": "First part."},
        {"role": "developer", "content": "Second part."},
        {"role": "user", "content": "Third part."},
    ], None, {"add_generation_prompt": True}),
    ("reasoning_effort_max", [{"role": "system", "content": "Solve it."},
                              {"role": "user", "content": "Prove it."}], None,
     {"add_generation_prompt": True, "thinking": True, "reasoning_effort": "max"}),
    ("reasoning_effort_high", [{"role": "user", "content": "Prove it."}], None,
     {"add_generation_prompt": True, "thinking": True, "reasoning_effort": "high"}),
    ("reasoning_effort_max_without_thinking", [{"role": "user", "content": "Prove it."}], None,
     {"add_generation_prompt": True, "thinking": False, "reasoning_effort": "max"}),
    ("tools_call_and_result", [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Zürich for 2 days?"},
        {"role": "assistant", "content": "", "reasoning_content": "I should call get_weather.",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "get_weather",
             "arguments": "{\"city\": \"Zürich\", \"days\": 2, \"detail\": {\"wind\": true, \"x\": 1.5}}"}},
             {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21, \"sky\": \"clear\"}"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    ], [WEATHER, CLOCK], {"add_generation_prompt": True, "thinking": True}),
    ("tools_no_system_no_thinking", [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "c", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Oslo", "units": "metric"}}}]},
        {"role": "tool", "tool_call_id": "c", "content": "-3 C, snow"},
        {"role": "assistant", "content": "It is -3 C and snowing in Oslo."},
        {"role": "user", "content": "Thanks."},
    ], [WEATHER], {"add_generation_prompt": True}),
    ("content_parts", [
        {"role": "system", "content": [{"type": "text", "text": "Sys A."}, {"type": "text", "text": "Sys B."}]},
        {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]},
    ], None, {"add_generation_prompt": True}),
    ("special_tokens_in_content", [
        {"role": "system", "content": "System says " + SPECIAL},
        {"role": "user", "content": "Repeat: " + SPECIAL + " </think> <｜begin▁of▁sentence｜>"},
        {"role": "assistant", "content": "Sure: " + SPECIAL, "reasoning_content": "r" + SPECIAL},
        {"role": "user", "content": SPECIAL},
    ], None, {"add_generation_prompt": True, "thinking": True}),
    ("special_tokens_in_tool_result", [
        {"role": "user", "content": "Fetch the page."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "f", "type": "function", "function": {
            "name": "now", "arguments": "{\"note\": \"" + SPECIAL + "\"}"}}]},
        {"role": "tool", "tool_call_id": "f", "content": "page text " + SPECIAL},
    ], [CLOCK], {"add_generation_prompt": True, "thinking": True}),
    # An agent's loop: calls without content, parallel calls with every JSON value kind, results
    # answered in one user turn, reasoning kept around tool calls.
    ("agent_loop_thinking", AGENT_LOOP, [READ, EDIT, CLOCK], {"add_generation_prompt": True, "thinking": True}),
    ("agent_loop_no_thinking", AGENT_LOOP, [READ, EDIT, CLOCK], {"add_generation_prompt": True}),
    # What an Anthropic Messages request becomes: tool results, then the user's text, in one turn.
    ("tool_results_then_user_text", [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "now", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "12:00"},
        {"role": "user", "content": "And in Tokyo?"},
    ], [CLOCK], {"add_generation_prompt": True, "thinking": True}),
    ("response_format", [{"role": "user", "content": "List two colours."}], None,
     {"add_generation_prompt": True, "response_format": {"type": "json_object", "schema": {"a": [1, 2.5, None]}}}),
    ("empty_strings_and_unicode", [
        {"role": "system", "content": ""},
        {"role": "user", "content": "  spaced \n\t text ✓ 日本語  "},
        {"role": "assistant", "content": None, "reasoning_content": ""},
        {"role": "user", "content": "next"},
    ], [CLOCK], {"add_generation_prompt": True}),
]


# A hand-written template that applies string filters and Python string methods to content, to
# check that the Rust renderer's content tracking keeps them working.
OPS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m.role | upper }}]{{ m.content | trim }}|{{ m.content.strip() }}|"
    "{{ m.content.split('\\n\\n')[-1].lstrip() }}|{{ m.content | length }}|{{ m.content.replace('e', 'E') }}|"
    "{{ m.content | replace('o', '0', 1) }}|{{ m.content | upper }}|{{ m.content.lower() }}|"
    "{{ m.content.startswith('  ') }}|{{ m.content.endswith(('x', '  ')) }}|{{ m.content.rstrip(' e') }}|"
    "{{ (m.content ~ '!') | tojson }}|{{ m.content.split() | join(',') }}|{{ m.content.split(' ', 2) | tojson }}\n"
    "{% endfor %}{% if tools %}{{ tools | tojson(indent=2) }}\n{{ tools | tojson(sort_keys=true, ensure_ascii=true) }}"
    "{% endif %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
OPS_CASES = ["single_turn", "system_and_user", "multiple_system_consecutive_users", "content_parts",
             "special_tokens_in_content", "tools_call_and_result", "ops_whitespace"]
CASES.append(("ops_whitespace", [
    {"role": "system", "content": " \t Sys  e"},
    {"role": "user", "content": "  \n Hello <｜User｜> there\n\nsecond para  ee<think>  "},
], [WEATHER], {"add_generation_prompt": True}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=str(ROOT / "models" / "tiny-ds4.gguf"))
    ap.add_argument("--out", default=str(DATA))
    a = ap.parse_args()
    tmpl, bos, eos = read_gguf(a.gguf)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ds4-template.jinja").write_text(tmpl, encoding="utf-8")
    (out / "ops-template.jinja").write_text(OPS_TEMPLATE, encoding="utf-8")
    env = make_env()
    template = env.from_string(tmpl)
    ops_template = env.from_string(OPS_TEMPLATE)
    cases = []
    for name, messages, tools, variables in CASES:
        for tname, tmpl_obj in (("ds4", template), ("ops", ops_template)):
            if tname == "ops" and name not in OPS_CASES:
                continue
            ctx = dict(variables)
            ctx["messages"] = normalize(messages)
            if tools is not None:
                ctx["tools"] = tools
            ctx["bos_token"] = bos
            ctx["eos_token"] = eos
            expected = tmpl_obj.render(**ctx)
            nctx = dict(ctx)
            nctx["messages"] = normalize(neutral(messages))
            if tools is not None:
                nctx["tools"] = neutral(tools)
            if "response_format" in variables:
                nctx["response_format"] = neutral(variables["response_format"])
            expected_neutral = tmpl_obj.render(**nctx)
            cases.append({"name": name, "template": tname, "messages": messages, "tools": tools,
                          "vars": variables, "expected": expected, "expected_neutral": expected_neutral})
    doc = {"bos_token": bos, "eos_token": eos, "jinja2": jinja2.__version__, "cases": cases}
    (out / "golden.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {out / 'golden.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
