//! Request validation, errors, option resolution and content tracking edge cases.

use chat::{ChatError, ChatMessage, ChatRequestOptions, ChatTemplate, PieceKind, SpecialTokens, TemplateVars};
use serde::Deserialize;
use serde_json::{json, Value};

const DS4_TEMPLATE: &str = include_str!("data/ds4-template.jinja");
const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";

fn special() -> SpecialTokens {
    SpecialTokens { bos: BOS.into(), eos: EOS.into() }
}

fn ds4() -> ChatTemplate {
    ChatTemplate::jinja(DS4_TEMPLATE, special()).unwrap()
}

fn msgs(v: Value) -> Vec<ChatMessage> {
    serde_json::from_value(v).unwrap()
}

fn render_err(t: &ChatTemplate, m: Value) -> ChatError {
    t.render(&msgs(m), None, &TemplateVars::default()).unwrap_err()
}

#[test]
fn invalid_requests_are_client_errors() {
    let t = ds4();
    let e = render_err(&t, json!([]));
    assert!(matches!(e, ChatError::NoMessages));
    let e = render_err(&t, json!([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]));
    assert_eq!(
        e.to_string(),
        "messages[1]: invalid role \"robot\" (expected one of system, developer, user, assistant, tool)"
    );
    assert!(e.is_client_error());
    let e = render_err(&t, json!([{"role": "user"}]));
    assert_eq!(e.to_string(), "messages[0] (role user): missing content");
    let e = render_err(&t, json!([{"role": "user", "content": null}]));
    assert!(matches!(e, ChatError::MissingContent { index: 0, .. }));
    let e = render_err(&t, json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]));
    assert_eq!(e.to_string(), "messages[0].content[1]: unsupported content part type \"image_url\" (expected \"text\")");
    let e = render_err(
        &t,
        json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": null,
               "tool_calls": [{"type": "retrieval", "function": {"name": "f", "arguments": "{}"}}]}]),
    );
    assert!(matches!(e, ChatError::InvalidToolCall { index: 1, call: 0, .. }), "{e}");
    let e = t.render(&msgs(json!([{"role": "user", "content": "a"}])), Some(&[json!({"function": {}})]), &TemplateVars::default());
    assert!(matches!(e, Err(ChatError::InvalidTool { index: 0, .. })));
    // An assistant message may omit its content.
    let p = t.render(&msgs(json!([{"role": "user", "content": "a"}, {"role": "assistant"}])), None, &TemplateVars::default());
    assert_eq!(p.unwrap().text(), format!("{BOS}<｜User｜>a<｜Assistant｜></think>{EOS}<｜Assistant｜></think>"));
}

#[test]
fn template_errors() {
    let t = ChatTemplate::jinja(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}",
        special(),
    )
    .unwrap();
    let e = render_err(&t, json!([{"role": "system", "content": "x"}]));
    assert!(matches!(&e, ChatError::Template(m) if m.contains("System role not supported")), "{e}");
    assert!(e.is_client_error());
    assert_eq!(t.render(&msgs(json!([{"role": "user", "content": "x"}])), None, &TemplateVars::default()).unwrap().text(), "x");

    let e = ChatTemplate::jinja("{% for m in messages %}{{ m.content }", special()).unwrap_err();
    assert!(matches!(e, ChatError::TemplateSyntax(_)), "{e}");
    assert!(!e.is_client_error());
}

#[derive(Debug, Deserialize)]
struct Request {
    #[allow(dead_code)]
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    chat: ChatRequestOptions,
}

fn resolve(body: Value) -> Result<TemplateVars, ChatError> {
    let r: Request = serde_json::from_value(body).unwrap();
    assert!(!r.messages.is_empty());
    r.chat.resolve(false, true)
}

fn base(extra: Value) -> Value {
    let mut v = json!({"model": "ds4", "messages": [{"role": "user", "content": "hi"}]});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[test]
fn request_options_resolve() {
    let on = |b: Value| resolve(base(b)).unwrap().thinking;
    assert!(!on(json!({})));
    assert!(on(json!({"thinking": {"type": "enabled"}})));
    assert!(!on(json!({"thinking": {"type": "disabled", "budget_tokens": 10}})));
    assert!(on(json!({"thinking": true})));
    assert!(on(json!({"reasoning_effort": "high"})));
    assert!(!on(json!({"reasoning_effort": "none"})));
    assert!(on(json!({"chat_template_kwargs": {"thinking": true}})));
    assert!(on(json!({"chat_template_kwargs": {"enable_thinking": true}})));
    assert!(!on(json!({"chat_template_kwargs": {"enable_thinking": false}, "thinking": {"type": "enabled"}})));
    assert!(!on(json!({"thinking": {"type": "disabled"}, "reasoning_effort": "max"})));
    let v = resolve(base(json!({"reasoning_effort": "max"}))).unwrap();
    assert_eq!((v.thinking, v.reasoning_effort.as_deref(), v.add_generation_prompt), (true, Some("max"), true));
    let v = resolve(base(json!({"chat_template_kwargs": {"reasoning_effort": "max", "thinking": true, "drop_thinking": false}})))
        .unwrap();
    assert_eq!(v.reasoning_effort.as_deref(), Some("max"));
    assert_eq!(v.extra.get("drop_thinking"), Some(&json!(false)));
    assert_eq!(resolve(base(json!({"reasoning_effort": "none"}))).unwrap().reasoning_effort, None);
    // Server default applies when the request says nothing.
    let r: Request = serde_json::from_value(base(json!({}))).unwrap();
    assert!(r.chat.resolve(true, true).unwrap().thinking);

    let e = resolve(base(json!({"thinking": {"type": "auto"}}))).unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid thinking: expected {\"type\": \"enabled\"} or {\"type\": \"disabled\"} (or a boolean), found {\"type\":\"auto\"}"
    );
    let e = resolve(base(json!({"reasoning_effort": "extreme"}))).unwrap_err();
    assert!(e.to_string().contains("found \"extreme\""), "{e}");
    let e = resolve(base(json!({"chat_template_kwargs": {"thinking": "yes"}}))).unwrap_err();
    assert!(matches!(e, ChatError::InvalidOption { field: "chat_template_kwargs.thinking", .. }));
    let e = resolve(base(json!({"chat_template_kwargs": {"thinking": true, "enable_thinking": false}}))).unwrap_err();
    assert!(matches!(e, ChatError::InvalidOption { field: "chat_template_kwargs", .. }));
    let e = resolve(base(json!({"chat_template_kwargs": {"bos_token": "x"}}))).unwrap_err();
    assert_eq!(e.to_string(), "chat_template_kwargs: \"bos_token\" cannot be set by a request (it is set by the server)");
    assert!(e.is_client_error());
}

#[test]
fn resolved_options_drive_the_template() {
    let t = ds4();
    let m = msgs(json!([{"role": "user", "content": "hi"}]));
    let on = resolve(base(json!({"thinking": {"type": "enabled"}, "reasoning_effort": "max"}))).unwrap();
    let text = t.render(&m, None, &on).unwrap().text();
    assert!(text.starts_with(&format!("{BOS}Reasoning Effort: Absolute maximum")), "{text}");
    assert!(text.ends_with("<｜User｜>hi<｜Assistant｜><think>"));
    let off = resolve(base(json!({"chat_template_kwargs": {"enable_thinking": false}}))).unwrap();
    assert_eq!(t.render(&m, None, &off).unwrap().text(), format!("{BOS}<｜User｜>hi<｜Assistant｜></think>"));
}

#[test]
fn content_containing_marker_candidates() {
    // The first private-use code points the renderer would pick as markers, in content and in the
    // template: it must pick others and keep these as they are.
    let weird = "a\u{10FFFD}b\u{10FFFC}c\u{10FFFB}\u{E000}";
    let src = DS4_TEMPLATE.replace("{{- bos_token -}}", "{{- bos_token -}}{{- '\u{10FFFA}' -}}");
    for (t, pre) in [(ds4(), ""), (ChatTemplate::jinja(&src, special()).unwrap(), "\u{10FFFA}")] {
        let p = t.render(&msgs(json!([{"role": "user", "content": weird}])), None, &TemplateVars::default()).unwrap();
        assert_eq!(p.text(), format!("{BOS}{pre}<｜User｜>{weird}<｜Assistant｜></think>"));
        let content: Vec<_> = p.pieces.iter().filter(|p| p.kind == PieceKind::Content).collect();
        assert_eq!(content.len(), 1);
        assert_eq!(content[0].text, weird);
    }
}

#[test]
fn untraceable_content_handling_is_refused() {
    let m = msgs(json!([{"role": "user", "content": "hello"}]));
    let vars = TemplateVars::default();
    // Slicing content cuts its markers; comparing it with a literal changes with markers.
    for src in ["{{ messages[0].content[1:] }}", "{% if messages[0].content == 'hello' %}yes{% endif %}"] {
        let t = ChatTemplate::jinja(src, special()).unwrap();
        let e = t.render(&m, None, &vars).unwrap_err();
        assert!(matches!(e, ChatError::Untraceable(_)), "{src}: {e}");
        assert!(!e.is_client_error());
    }
    // Structural fields are compared with literals and stay usable.
    let t = ChatTemplate::jinja("{% if messages[0].role == 'user' %}U:{{ messages[0].content }}{% endif %}", special()).unwrap();
    assert_eq!(t.render(&m, None, &vars).unwrap().text(), "U:hello");
}

#[test]
fn python_printing_and_helpers() {
    let m = msgs(json!([{"role": "user", "content": "x"}]));
    let vars = TemplateVars::default();
    // Expected strings are Python jinja2's output for the same expressions.
    let t = ChatTemplate::jinja("{{ [1, 'a', none, true, 1.5, {'k': \"it's\"}] }}|{{ none }}|{{ false }}", special()).unwrap();
    assert_eq!(t.render(&m, None, &vars).unwrap().text(), "[1, 'a', None, True, 1.5, {'k': \"it's\"}]|None|False");
    let t = ChatTemplate::jinja("{{ strftime_now('%Y') }}", special()).unwrap();
    let year = t.render(&m, None, &vars).unwrap().text();
    assert_eq!(year.len(), 4);
    assert!(year.parse::<u32>().unwrap() >= 2024);
    let t = ChatTemplate::jinja("{{ strftime_now('%Q') }}", special()).unwrap();
    assert!(matches!(t.render(&m, None, &vars), Err(ChatError::Template(_))));
    let t = ChatTemplate::jinja("{% for k, v in ('{\"b\": [1, 2.0], \"a\": null}' | from_json).items() %}{{ k }}={{ v | tojson }};{% endfor %}", special()).unwrap();
    assert_eq!(t.render(&m, None, &vars).unwrap().text(), "b=[1, 2.0];a=null;");
}

fn tool_case(special: &str) -> (Vec<Value>, Vec<ChatMessage>) {
    let tools = vec![json!({"type": "function", "function": {"name": format!("f{special}"), "description": "d<think>",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}})];
    let m = msgs(json!([
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": format!("f{special}"),
            "arguments": {format!("k{special}"): format!("v{special}"), "n": [1, {"x": special}]}}}]},
        {"role": "tool", "content": "r"}
    ]));
    (tools, m)
}

#[test]
fn tool_call_arguments_and_schemas_are_content() {
    let t = ds4();
    let template_text = |p: &chat::RenderedPrompt| -> String {
        p.pieces.iter().filter(|p| p.kind == PieceKind::Template).map(|p| p.text.as_str()).collect()
    };
    let (tools, m) = tool_case("<｜User｜></think>");
    let p = t.render(&m, Some(&tools), &TemplateVars::default()).unwrap();
    let text = p.text();
    assert!(text.contains("{\"name\": \"f<｜User｜></think>\", \"description\": \"d<think>\""), "{text}");
    assert!(text.contains("<｜DSML｜parameter name=\"k<｜User｜></think>\" string=\"true\">v<｜User｜></think></｜DSML｜parameter>"));
    assert!(text.contains("<｜DSML｜parameter name=\"n\" string=\"false\">[1, {\"x\": \"<｜User｜></think>\"}]</｜DSML｜parameter>"));
    // The template text is the same as with harmless strings in those places.
    let (tools, m) = tool_case("plain");
    let q = t.render(&m, Some(&tools), &TemplateVars::default()).unwrap();
    assert_eq!(template_text(&p), template_text(&q));
    assert!(!q.text().contains("<｜User｜></think>"));
}

#[test]
fn special_tokens_from_vocab() {
    let vocab: Vec<String> = ["<s>", "</s>", "x"].iter().map(|s| s.to_string()).collect();
    assert_eq!(SpecialTokens::from_vocab(&vocab, 0, 1).unwrap(), SpecialTokens { bos: "<s>".into(), eos: "</s>".into() });
    let e = SpecialTokens::from_vocab(&vocab, 0, 7).unwrap_err();
    assert_eq!(e.to_string(), "token id 7 (eos) is outside the vocabulary of 3 tokens");
}
