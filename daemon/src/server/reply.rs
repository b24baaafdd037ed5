//! A chat reply as it comes from the engine: reasoning, content and, when the request offered
//! tools, the tool calls of the DSML blocks in the content (`chat::dsml`; a block that does not
//! parse stays content). [`ToolPlan`] decides from a request's tools and tool choice what the
//! template renders and whether a call is forced; [`Reply`] reads the engine's events into
//! [`Part`]s. Both APIs (OpenAI chat completions, Anthropic messages) go through them.
//!
//! A required call (`tool_choice` `"required"`, or a named function) is forced by writing the
//! start of a tool-call block after the generation prompt, as the template renders it for a turn
//! without content, so the model's reply continues inside the block (of the named function when
//! there is one). llama-server constrains sampling with a grammar instead; without one, a reply
//! that goes astray inside the forced block is returned as its text (the opening included), and
//! the finish reason says why it ended. The reasoning of a thinking turn comes before its calls,
//! so a forced call cannot be combined with thinking (Anthropic's API refuses that combination too).
use std::collections::VecDeque;

use chat::dsml::{call_opening, ParsedCall, ReplyPiece, ToolCallStream};
use chat::PromptPiece;
use serde_json::Value;

use super::error::ApiError;
use crate::engine::{Event, FinishReason, Handle, Summary};

/// What the request asks of tool use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Tools are not rendered; the reply is text.
    None,
    /// The model decides.
    Auto,
    /// A call of some tool.
    Required,
    /// A call of this function.
    Function(String),
}

impl ToolChoice {
    /// OpenAI's `tool_choice`: `"none"`, `"auto"` (the default), `"required"` or
    /// `{"type": "function", "function": {"name": NAME}}`.
    pub fn from_openai(v: Option<&Value>) -> Result<ToolChoice, ApiError> {
        let bad = |found: &Value| {
            ApiError::bad(format!(
                "tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, found {found}"
            ))
            .param("tool_choice")
        };
        match v {
            None | Some(Value::Null) => Ok(ToolChoice::Auto),
            Some(Value::String(s)) => match s.as_str() {
                "none" => Ok(ToolChoice::None),
                "auto" => Ok(ToolChoice::Auto),
                "required" => Ok(ToolChoice::Required),
                _ => Err(bad(&Value::String(s.clone()))),
            },
            Some(o @ Value::Object(m)) if m.get("type").and_then(Value::as_str) == Some("function") => {
                match m.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
                    Some(name) => Ok(ToolChoice::Function(name.to_string())),
                    None => Err(bad(o)),
                }
            }
            Some(other) => Err(bad(other)),
        }
    }

    fn describe(&self) -> String {
        match self {
            ToolChoice::None => "none".into(),
            ToolChoice::Auto => "auto".into(),
            ToolChoice::Required => "required".into(),
            ToolChoice::Function(name) => format!("the function {name:?}"),
        }
    }
}

/// How one request's tools reach the prompt and come back.
#[derive(Debug, Clone)]
pub struct ToolPlan {
    /// The tools the template renders (OpenAI's shape); none with tool choice `none`.
    pub tools: Option<Vec<Value>>,
    /// Written after the generation prompt: the start of a tool call, when one is required.
    pub opening: Vec<PromptPiece>,
}

impl ToolPlan {
    pub fn new(tools: Option<Vec<Value>>, choice: ToolChoice, thinking: bool) -> Result<ToolPlan, ApiError> {
        let tools = tools.filter(|t| !t.is_empty());
        let name = match &choice {
            ToolChoice::None => return Ok(ToolPlan { tools: None, opening: Vec::new() }),
            ToolChoice::Auto => return Ok(ToolPlan { tools, opening: Vec::new() }),
            ToolChoice::Required => None,
            ToolChoice::Function(name) => Some(name.as_str()),
        };
        let bad = |msg: String| Err(ApiError::bad(msg).param("tool_choice"));
        let Some(list) = &tools else { return bad(format!("tool_choice {} needs tools", choice.describe())) };
        if thinking {
            return bad(format!(
                "tool_choice {} cannot be combined with thinking (a forced call is written right after the \
                 generation prompt, and a thinking turn reasons first): turn thinking off or let the model choose",
                choice.describe()
            ));
        }
        if let Some(name) = name {
            let offered = list.iter().any(|t| {
                t.get("type").and_then(Value::as_str) == Some("function")
                    && t.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) == Some(name)
            });
            if !offered {
                return bad(format!("tool_choice names the function {name:?}, which is not among the tools"));
            }
        }
        Ok(ToolPlan { tools, opening: call_opening(name) })
    }

    /// A reader of the reply's tool calls (when tools were rendered), which has already read the
    /// opening written into the prompt.
    pub fn call_stream(&self) -> Option<ToolCallStream> {
        self.tools.as_ref()?;
        let mut s = ToolCallStream::new();
        let opening: String = self.opening.iter().map(|p| p.text.as_str()).collect();
        // the opening starts a block: nothing is decided before the model's reply
        let decided = s.push(&opening);
        debug_assert!(decided.is_empty());
        Some(s)
    }
}

/// A tool call of a reply: its place among the reply's calls, its id and the call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub index: usize,
    pub id: String,
    pub call: ParsedCall,
}

impl Call {
    /// The arguments as a JSON text.
    pub fn arguments_json(&self) -> String {
        Value::Object(self.call.arguments.clone()).to_string()
    }
}

/// A part of a reply, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Reasoning(String),
    Content(String),
    Calls(Vec<Call>),
}

pub enum Next {
    Part(Part),
    /// The end: nothing follows.
    Done(Summary),
}

/// Reads one request's events. Dropping it drops the handle, which cancels the request.
pub struct Reply {
    handle: Handle,
    calls: Option<ToolCallStream>,
    /// Tool call ids are this prefix and the call's index.
    id_prefix: String,
    n_calls: usize,
    ready: VecDeque<Part>,
    done: Option<Summary>,
}

impl Reply {
    pub fn new(handle: Handle, calls: Option<ToolCallStream>, id_prefix: String) -> Reply {
        Reply { handle, calls, id_prefix, n_calls: 0, ready: VecDeque::new(), done: None }
    }

    /// Whether the reply has made tool calls so far.
    pub fn made_calls(&self) -> bool {
        self.n_calls > 0
    }

    fn take(&mut self, pieces: Vec<ReplyPiece>) {
        for p in pieces {
            match p {
                ReplyPiece::Text(t) => self.ready.push_back(Part::Content(t)),
                ReplyPiece::Calls(calls) => {
                    let calls = calls
                        .into_iter()
                        .map(|call| {
                            let index = self.n_calls;
                            self.n_calls += 1;
                            Call { index, id: format!("{}{index}", self.id_prefix), call }
                        })
                        .collect();
                    self.ready.push_back(Part::Calls(calls));
                }
            }
        }
    }

    /// The next part, then the summary. A cancelled request, an engine error or an engine that
    /// went away is an error.
    pub async fn next(&mut self) -> Result<Next, ApiError> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Ok(Next::Part(p));
            }
            if let Some(s) = self.done.take() {
                return Ok(Next::Done(s));
            }
            match self.handle.events.recv().await {
                Some(Event::Text { reasoning: true, text }) => self.ready.push_back(Part::Reasoning(text)),
                Some(Event::Text { reasoning: false, text }) => match self.calls.as_mut() {
                    Some(s) => {
                        let pieces = s.push(&text);
                        self.take(pieces);
                    }
                    None => self.ready.push_back(Part::Content(text)),
                },
                Some(Event::Done(s)) if s.finish == FinishReason::Cancelled => return Err(ApiError::cancelled()),
                Some(Event::Done(s)) => {
                    if let Some(pieces) = self.calls.as_mut().map(ToolCallStream::finish) {
                        self.take(pieces);
                    }
                    self.done = Some(s);
                }
                Some(Event::Error(e)) => return Err(ApiError::server(e)),
                None => return Err(ApiError::server("the engine stopped without finishing the request")),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::Timings;
    use serde_json::json;
    use tokio::sync::mpsc::unbounded_channel;

    /// A handle whose events are `texts` (content, or reasoning where marked) and then `Done`.
    pub(crate) fn handle(texts: &[(bool, &str)], finish: FinishReason, stop_sequence: Option<&str>) -> Handle {
        let (tx, events) = unbounded_channel();
        for (reasoning, text) in texts {
            tx.send(Event::Text { reasoning: *reasoning, text: text.to_string() }).expect("send");
        }
        let summary = Summary {
            finish,
            stop_sequence: stop_sequence.map(str::to_string),
            prompt_tokens: 7,
            completion_tokens: texts.len(),
            timings: Timings::default(),
        };
        tx.send(Event::Done(summary)).expect("send");
        Handle { events }
    }

    pub(crate) fn weather_tools() -> Vec<Value> {
        vec![json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}})]
    }

    async fn parts(mut r: Reply) -> (Vec<Part>, Summary) {
        let mut out = Vec::new();
        loop {
            match r.next().await.expect("no error") {
                Next::Part(p) => out.push(p),
                Next::Done(s) => return (out, s),
            }
        }
    }

    fn args(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[tokio::test]
    async fn calls_are_read_from_content_split_anywhere() {
        let plan = ToolPlan::new(Some(weather_tools()), ToolChoice::Auto, true).expect("plan");
        let h = handle(
            &[
                (true, "Need the weather."),
                (false, "Checking.\n"),
                (false, "\n<｜DSML｜tool_"),
                (false, "calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Oslo</｜DSML｜parameter>\n"),
                (false, "<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"),
            ],
            FinishReason::Stop,
            None,
        );
        let (parts, s) = parts(Reply::new(h, plan.call_stream(), "call_x_".into())).await;
        let call = Call { index: 0, id: "call_x_0".into(), call: ParsedCall { name: "get_weather".into(), arguments: args(json!({"city": "Oslo", "days": 2})) } };
        assert_eq!(call.arguments_json(), r#"{"city":"Oslo","days":2}"#);
        assert_eq!(
            parts,
            vec![Part::Reasoning("Need the weather.".into()), Part::Content("Checking.".into()), Part::Calls(vec![call])]
        );
        assert_eq!(s.finish, FinishReason::Stop);
    }

    #[tokio::test]
    async fn without_tools_dsml_is_content() {
        let text = "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
        let plan = ToolPlan::new(Some(weather_tools()), ToolChoice::None, false).expect("plan");
        assert!(plan.tools.is_none() && plan.call_stream().is_none());
        let (p, _) = parts(Reply::new(handle(&[(false, text)], FinishReason::Stop, None), plan.call_stream(), "c".into())).await;
        assert_eq!(p, vec![Part::Content(text.into())]);
    }

    #[tokio::test]
    async fn a_forced_call_reads_its_opening_and_falls_back_to_text() {
        let plan = ToolPlan::new(Some(weather_tools()), ToolChoice::Function("get_weather".into()), false).expect("plan");
        let opening: String = plan.opening.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(opening, "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n");
        // the model closes the block: a call
        let h = handle(&[(false, "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")], FinishReason::Stop, None);
        let (p, _) = parts(Reply::new(h, plan.call_stream(), "t".into())).await;
        let call = ParsedCall { name: "get_weather".into(), arguments: Default::default() };
        assert_eq!(p, vec![Part::Calls(vec![Call { index: 0, id: "t0".into(), call }])]);
        // it runs out of tokens inside the block: the whole text, opening included
        let h = handle(&[(false, "<｜DSML｜parameter name=\"ci")], FinishReason::Length, None);
        let (p, s) = parts(Reply::new(h, plan.call_stream(), "t".into())).await;
        assert_eq!(p, vec![Part::Content(format!("{opening}<｜DSML｜parameter name=\"ci"))]);
        assert_eq!(s.finish, FinishReason::Length);
    }

    #[test]
    fn tool_choice_is_checked() {
        let t = || Some(weather_tools());
        assert_eq!(ToolChoice::from_openai(None).expect("auto"), ToolChoice::Auto);
        assert_eq!(ToolChoice::from_openai(Some(&json!("required"))).expect("required"), ToolChoice::Required);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        assert_eq!(ToolChoice::from_openai(Some(&named)).expect("named"), ToolChoice::Function("get_weather".into()));
        for bad in [json!("always"), json!({"type": "function"}), json!(3)] {
            let e = ToolChoice::from_openai(Some(&bad)).expect_err("bad");
            assert!(e.message.contains("tool_choice must be"), "{}", e.message);
        }
        let e = ToolPlan::new(None, ToolChoice::Required, false).expect_err("no tools");
        assert_eq!(e.message, "tool_choice required needs tools");
        let e = ToolPlan::new(t(), ToolChoice::Function("nope".into()), false).expect_err("unknown");
        assert!(e.message.contains("\"nope\", which is not among the tools"), "{}", e.message);
        let e = ToolPlan::new(t(), ToolChoice::Required, true).expect_err("thinking");
        assert!(e.message.contains("cannot be combined with thinking"), "{}", e.message);
        assert_eq!(e.status, 400);
        // a required call opens the block up to the name
        let plan = ToolPlan::new(t(), ToolChoice::Required, false).expect("required");
        let opening: String = plan.opening.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(opening, "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"");
        // auto with an empty tool list renders no tools
        assert!(ToolPlan::new(Some(Vec::new()), ToolChoice::Auto, false).expect("auto").tools.is_none());
    }
}
