//! The DSML tool-call parser against what the template renders: every assistant turn of every
//! golden prompt (rendered by Python jinja2 from the GGUF's template, tests/data/golden.json;
//! the `expected_neutral` render, where request strings cannot spell control tokens) read back
//! through `ToolCallStream` gives the message's content and tool calls; and the
//! opening used to force a tool call is what the template renders for one.

use chat::dsml::{call_opening, ParsedCall, ReplyPiece, ToolCallStream};
use chat::{ChatMessage, ChatTemplate, SpecialTokens, TemplateVars};
use serde_json::{json, Map, Value};

const DS4_TEMPLATE: &str = include_str!("data/ds4-template.jinja");
const GOLDEN: &str = include_str!("data/golden.json");
const ASSISTANT: &str = "<｜Assistant｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";

/// The text the model generates for each finished assistant turn of a rendered prompt: after
/// the thinking part (`</think>`), up to the end of the turn.
fn assistant_turns(prompt: &str) -> Vec<&str> {
    prompt
        .split(ASSISTANT)
        .skip(1)
        .filter_map(|turn| turn.split_once(EOS).map(|(t, _)| t))
        .map(|t| t.split_once("</think>").map_or(t, |(_, after)| after))
        .collect()
}

fn read_back(text: &str) -> (String, Vec<ParsedCall>) {
    let mut s = ToolCallStream::new();
    let mut pieces = Vec::new();
    // token-sized pushes, as the engine delivers text
    let chars: Vec<char> = text.chars().collect();
    for chunk in chars.chunks(3) {
        pieces.extend(s.push(&chunk.iter().collect::<String>()));
    }
    pieces.extend(s.finish());
    let (mut content, mut calls) = (String::new(), Vec::new());
    for p in pieces {
        match p {
            ReplyPiece::Text(t) => content.push_str(&t),
            ReplyPiece::Calls(c) => calls.extend(c),
        }
    }
    (content, calls)
}

/// The same map as `neutral` in tools/make_chat_golden.py.
fn neutral(v: &Value, key: Option<&str>) -> Value {
    match v {
        Value::String(s) if !matches!(key, Some("role" | "type")) => Value::String(s.replace('<', "[").replace('>', "]")),
        Value::Array(a) => Value::Array(a.iter().map(|x| neutral(x, None)).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, x)| (k.clone(), neutral(x, Some(k)))).collect()),
        other => other.clone(),
    }
}

fn arguments(v: &Value) -> Map<String, Value> {
    match v {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        Value::Object(o) => o.clone(),
        Value::Null => Map::new(),
        other => panic!("arguments {other}"),
    }
}

#[test]
fn golden_assistant_turns_read_back_to_their_messages() {
    let doc: Value = serde_json::from_str(GOLDEN).unwrap();
    let mut calls_checked = 0;
    for case in doc["cases"].as_array().unwrap().iter().filter(|c| c["template"] == "ds4") {
        let name = case["name"].as_str().unwrap();
        let messages = neutral(&case["messages"], None);
        let assistants: Vec<&Value> = messages.as_array().unwrap().iter().filter(|m| m["role"] == "assistant").collect();
        let turns = assistant_turns(case["expected_neutral"].as_str().unwrap());
        assert_eq!(turns.len(), assistants.len(), "{name}");
        for (turn, msg) in turns.iter().zip(assistants) {
            let (content, calls) = read_back(turn);
            assert_eq!(content, msg["content"].as_str().unwrap_or(""), "{name}: {turn:?}");
            let want: Vec<ParsedCall> = msg["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| ParsedCall {
                    name: c["function"]["name"].as_str().unwrap().to_string(),
                    arguments: arguments(&c["function"]["arguments"]),
                })
                .collect();
            assert_eq!(calls, want, "{name}: {turn:?}");
            calls_checked += calls.len();
        }
    }
    // tools_call_and_result 2, tools_no_system_no_thinking 1, special_tokens_in_tool_result 1,
    // agent_loop_* 3 each, tool_results_then_user_text 1
    assert_eq!(calls_checked, 11);
}

#[test]
fn the_forced_opening_is_how_the_template_starts_a_tool_call() {
    let special = SpecialTokens { bos: "<｜begin▁of▁sentence｜>".into(), eos: EOS.into() };
    let t = ChatTemplate::jinja(DS4_TEMPLATE, special).unwrap();
    let tools = [json!({"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}})];
    let user: Vec<ChatMessage> = serde_json::from_value(json!([{"role": "user", "content": "Time?"}])).unwrap();
    let with_call: Vec<ChatMessage> = serde_json::from_value(json!([
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    ]))
    .unwrap();
    let vars = |gen| TemplateVars { add_generation_prompt: gen, ..TemplateVars::default() };
    let prompt = t.render(&user, Some(&tools), &vars(true)).unwrap().text();
    let finished = t.render(&with_call, Some(&tools), &vars(false)).unwrap().text();
    for name in [None, Some("now")] {
        let opening: String = call_opening(name).iter().map(|p| p.text.as_str()).collect();
        let forced = format!("{prompt}{opening}");
        assert!(finished.starts_with(&forced), "{name:?}:\n{forced:?}\n{finished:?}");
    }
    let named = call_opening(Some("now"));
    assert_eq!(named.iter().filter(|p| p.kind == chat::PieceKind::Content).map(|p| p.text.as_str()).collect::<Vec<_>>(), ["now"]);
}
