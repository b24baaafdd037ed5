//! DeepSeek V4's DSML tool-call blocks, read back from generated text.
//!
//! The GGUF's chat template renders an assistant message's `tool_calls` after its content (the
//! two separated by a blank line) as one block:
//!
//! ```text
//! \n\n<｜DSML｜tool_calls>\n
//! <｜DSML｜invoke name="NAME">\n
//! <｜DSML｜parameter name="KEY" string="true">RAW TEXT</｜DSML｜parameter>\n   a string argument
//! <｜DSML｜parameter name="KEY" string="false">JSON</｜DSML｜parameter>\n      any other argument
//! \n                                                                         (an invoke without arguments)
//! </｜DSML｜invoke>\n
//! ...one invoke per call...
//! </｜DSML｜tool_calls>
//! ```
//!
//! followed by the end of the turn. [`parse_block`] inverts that rendering (whitespace between
//! the tags is not significant to it; everything inside a tag and every value is taken exactly),
//! and [`ToolCallStream`] finds the blocks in a stream of generated content: the text around them
//! passes through, a block becomes its calls once it closes and parses, and a block that does not
//! parse (or never closes) comes back as the text it was.

use serde_json::{Map, Value};

use crate::taint::{push_piece, PieceKind, PromptPiece};

/// The DSML marker (one token of the DeepSeek V4 vocabulary).
pub const DSML: &str = "｜DSML｜";
/// Opens a tool-call block.
pub const TOOL_CALLS_START: &str = "<｜DSML｜tool_calls>";
/// Closes a tool-call block.
pub const TOOL_CALLS_END: &str = "</｜DSML｜tool_calls>";
/// What the template writes between the content and the block.
pub const SEPARATOR: &str = "\n\n";
const INVOKE_START: &str = "<｜DSML｜invoke name=\"";
const INVOKE_END: &str = "</｜DSML｜invoke>";
const PARAM_START: &str = "<｜DSML｜parameter name=\"";
const PARAM_END: &str = "</｜DSML｜parameter>";
const NAME_END: &str = "\">";
const STRING_ATTR: &str = "\" string=\"";

/// One tool call read from a block: the function name and its arguments, in the order written.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: Map<String, Value>,
}

/// Why a block is not a tool call (the block is then returned as text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed DSML tool-call block at byte {at}: {what}")]
pub struct DsmlError {
    pub at: usize,
    pub what: String,
}

struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: impl Into<String>) -> DsmlError {
        DsmlError { at: self.at, what: what.into() }
    }

    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    fn skip_space(&mut self) {
        let rest = self.rest();
        self.at += rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_whitespace()).len();
    }

    fn eat(&mut self, s: &str) -> bool {
        if self.rest().starts_with(s) {
            self.at += s.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, s: &str) -> Result<(), DsmlError> {
        if self.eat(s) {
            Ok(())
        } else {
            Err(self.err(format!("expected {s:?}")))
        }
    }

    /// The text up to `end` (which is consumed too).
    fn until(&mut self, end: &str, what: &str) -> Result<&'a str, DsmlError> {
        let rest = self.rest();
        let n = rest.find(end).ok_or_else(|| self.err(format!("{what} without {end:?}")))?;
        self.at += n + end.len();
        Ok(&rest[..n])
    }
}

/// Parses one block, from [`TOOL_CALLS_START`] to [`TOOL_CALLS_END`] (nothing before or after),
/// into its calls: a `string="true"` value is the raw text, a `string="false"` one is parsed as
/// JSON. A block without invokes, an empty name, a repeated parameter, a `string` attribute other
/// than true/false or a value that is not JSON where JSON is due are errors.
pub fn parse_block(block: &str) -> Result<Vec<ParsedCall>, DsmlError> {
    let mut c = Cursor { text: block, at: 0 };
    c.expect(TOOL_CALLS_START)?;
    let mut calls = Vec::new();
    loop {
        c.skip_space();
        if c.eat(TOOL_CALLS_END) {
            break;
        }
        calls.push(parse_invoke(&mut c)?);
    }
    if !c.rest().is_empty() {
        return Err(c.err("text after the end of the block"));
    }
    if calls.is_empty() {
        return Err(c.err("a block without invokes"));
    }
    Ok(calls)
}

fn parse_invoke(c: &mut Cursor<'_>) -> Result<ParsedCall, DsmlError> {
    c.expect(INVOKE_START)?;
    let at = c.at;
    let name = c.until(NAME_END, "an invoke name")?;
    if name.is_empty() {
        return Err(DsmlError { at, what: "an invoke with an empty name".into() });
    }
    let mut arguments = Map::new();
    loop {
        c.skip_space();
        if c.eat(INVOKE_END) {
            return Ok(ParsedCall { name: name.to_string(), arguments });
        }
        c.expect(PARAM_START)?;
        let at = c.at;
        let key = c.until(STRING_ATTR, "a parameter name")?;
        let is_string = c.until(NAME_END, "a string attribute")?;
        let raw = c.until(PARAM_END, "a parameter value")?;
        let value = match is_string {
            "true" => Value::String(raw.to_string()),
            "false" => serde_json::from_str(raw)
                .map_err(|e| DsmlError { at, what: format!("parameter {key:?} is not JSON: {e}") })?,
            other => return Err(DsmlError { at, what: format!("parameter {key:?} has string={other:?}") }),
        };
        if arguments.insert(key.to_string(), value).is_some() {
            return Err(DsmlError { at, what: format!("parameter {key:?} given twice") });
        }
    }
}

/// The start of an assistant turn that makes a tool call, as the template renders it after the
/// generation prompt when the turn has no content: the block's opening, then the first invoke
/// up to its name, and with `name` the name and the end of the invoke tag. Generation continued
/// from here is a tool call (of `name` when given). The name is request content.
pub fn call_opening(name: Option<&str>) -> Vec<PromptPiece> {
    let mut pieces = Vec::new();
    push_piece(&mut pieces, &format!("{SEPARATOR}{TOOL_CALLS_START}\n{INVOKE_START}"), PieceKind::Template);
    if let Some(name) = name {
        push_piece(&mut pieces, name, PieceKind::Content);
        push_piece(&mut pieces, &format!("{NAME_END}\n"), PieceKind::Template);
    }
    pieces
}

/// The length of the longest tail of `text` that is a proper prefix of `pattern` (text that may
/// still become `pattern` as more arrives), on a character boundary.
pub fn partial_match_len(text: &str, pattern: &str) -> usize {
    for k in (1..pattern.len().min(text.len() + 1)).rev() {
        let start = text.len() - k;
        if text.is_char_boundary(start) && pattern.starts_with(&text[start..]) {
            return k;
        }
    }
    0
}

/// A part of a reply read through [`ToolCallStream`].
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyPiece {
    Text(String),
    /// The calls of one block, in order.
    Calls(Vec<ParsedCall>),
}

fn push_text(out: &mut Vec<ReplyPiece>, text: &str) {
    if text.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(ReplyPiece::Text(t)) => t.push_str(text),
        _ => out.push(ReplyPiece::Text(text.to_string())),
    }
}

/// Splits generated content into text and tool-call blocks as it arrives. Text that may be the
/// start of a block (or of the blank line before one) is held back until it is decided; a block
/// is held until it closes. The separator before a block is the template's, not content: it is
/// dropped when the block parses and kept when the block is returned as text, so the text pieces
/// of a malformed block add up to exactly what was generated.
#[derive(Debug, Default)]
pub struct ToolCallStream {
    buf: String,
    /// Inside a block: `buf` starts with [`TOOL_CALLS_START`].
    in_block: bool,
    /// The separator that preceded the current block.
    separator: &'static str,
}

impl ToolCallStream {
    pub fn new() -> ToolCallStream {
        ToolCallStream::default()
    }

    /// Adds generated content; returns what is decided.
    pub fn push(&mut self, text: &str) -> Vec<ReplyPiece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_block {
                let Some(end) = self.buf.find(TOOL_CALLS_END) else { break };
                let block: String = self.buf.drain(..end + TOOL_CALLS_END.len()).collect();
                match parse_block(&block) {
                    Ok(calls) => out.push(ReplyPiece::Calls(calls)),
                    Err(e) => {
                        tracing::debug!("returning a tool-call block as text: {e}");
                        push_text(&mut out, self.separator);
                        push_text(&mut out, &block);
                    }
                }
                self.in_block = false;
                continue;
            }
            match self.buf.find(TOOL_CALLS_START) {
                Some(start) => {
                    let before: String = self.buf.drain(..start).collect();
                    let content = match before.strip_suffix(SEPARATOR) {
                        Some(c) => {
                            self.separator = SEPARATOR;
                            c
                        }
                        None => {
                            self.separator = "";
                            before.as_str()
                        }
                    };
                    push_text(&mut out, content);
                    self.in_block = true;
                }
                None => {
                    let opening = format!("{SEPARATOR}{TOOL_CALLS_START}");
                    let hold = partial_match_len(&self.buf, &opening).max(partial_match_len(&self.buf, TOOL_CALLS_START));
                    let text: String = self.buf.drain(..self.buf.len() - hold).collect();
                    push_text(&mut out, &text);
                    break;
                }
            }
        }
        out
    }

    /// The end of generation: held text, and an unclosed block, are text after all.
    pub fn finish(&mut self) -> Vec<ReplyPiece> {
        let mut out = Vec::new();
        if self.in_block {
            push_text(&mut out, self.separator);
            self.in_block = false;
        }
        push_text(&mut out, &std::mem::take(&mut self.buf));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, args: Value) -> ParsedCall {
        ParsedCall { name: name.into(), arguments: args.as_object().cloned().unwrap_or_default() }
    }

    #[test]
    fn parses_every_value_kind() {
        let block = "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n\
            <｜DSML｜parameter name=\"s\" string=\"true\">a \"quoted\"\nline <b></｜DSML｜parameter>\n\
            <｜DSML｜parameter name=\"n\" string=\"false\">-1.5e3</｜DSML｜parameter>\n\
            <｜DSML｜parameter name=\"o\" string=\"false\">{\"k\": [1, null, true]}</｜DSML｜parameter>\n\
            </｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
        let calls = parse_block(block).unwrap();
        assert_eq!(
            calls,
            vec![
                call("f", json!({"s": "a \"quoted\"\nline <b>", "n": -1.5e3, "o": {"k": [1, null, true]}})),
                call("g", json!({})),
            ]
        );
        assert_eq!(calls[0].arguments.keys().collect::<Vec<_>>(), ["s", "n", "o"]);
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let ok = |inner: &str| format!("{TOOL_CALLS_START}\n{inner}{TOOL_CALLS_END}");
        let bad = [
            ok(""),
            ok("<｜DSML｜invoke name=\"\">\n</｜DSML｜invoke>\n"),
            ok("<｜DSML｜invoke name=\"f\">\n"),
            ok("<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"maybe\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n"),
            ok("<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"false\">{oops</｜DSML｜parameter>\n</｜DSML｜invoke>\n"),
            ok("<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\" string=\"true\">1</｜DSML｜parameter>\n<｜DSML｜parameter name=\"a\" string=\"true\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n"),
            ok("<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"a\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n"),
            ok("text <｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n"),
            format!("{}x", ok("<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n")),
        ];
        for b in &bad {
            assert!(parse_block(b).is_err(), "{b:?}");
        }
        let e = parse_block(&bad[4]).unwrap_err();
        assert!(e.to_string().contains("parameter \"a\" is not JSON"), "{e}");
    }

    fn run(pieces: &[&str]) -> Vec<ReplyPiece> {
        let mut s = ToolCallStream::new();
        let mut out = Vec::new();
        for p in pieces {
            for r in s.push(p) {
                match (out.last_mut(), r) {
                    (Some(ReplyPiece::Text(t)), ReplyPiece::Text(n)) => t.push_str(&n),
                    (_, r) => out.push(r),
                }
            }
        }
        for r in s.finish() {
            match (out.last_mut(), r) {
                (Some(ReplyPiece::Text(t)), ReplyPiece::Text(n)) => t.push_str(&n),
                (_, r) => out.push(r),
            }
        }
        out
    }

    /// Every split of `text` into two pushes gives the same result as one push.
    fn all_splits(text: &str) -> Vec<ReplyPiece> {
        let whole = run(&[text]);
        for (i, _) in text.char_indices() {
            assert_eq!(run(&[&text[..i], &text[i..]]), whole, "split at {i}");
        }
        whole
    }

    #[test]
    fn stream_splits_text_and_calls_at_any_boundary() {
        let text = "Let me check.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"now\">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
        assert_eq!(all_splits(text), vec![ReplyPiece::Text("Let me check.".into()), ReplyPiece::Calls(vec![call("now", json!({}))])]);
        // no content, no separator
        let text = "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"now\">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";
        assert_eq!(all_splits(text), vec![ReplyPiece::Calls(vec![call("now", json!({}))])]);
    }

    #[test]
    fn malformed_or_unclosed_blocks_come_back_as_the_text_generated() {
        for text in [
            "a\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜tool_calls> and on",
            "a\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"x\" str",
            "a\n\n<｜DSML｜tool_",
            "a\n\n",
            "<｜DSML｜tool_calls></｜DSML｜tool_calls>",
        ] {
            assert_eq!(all_splits(text), vec![ReplyPiece::Text(text.into())], "{text:?}");
        }
    }

    #[test]
    fn held_text_is_released_once_decided() {
        let mut s = ToolCallStream::new();
        assert_eq!(s.push("Hi\n"), vec![ReplyPiece::Text("Hi".into())]);
        assert_eq!(s.push("\n<｜DS"), vec![]);
        assert_eq!(s.push("ML｜x"), vec![ReplyPiece::Text("\n\n<｜DSML｜x".into())]);
    }

    #[test]
    fn partial_match_respects_char_boundaries() {
        assert_eq!(partial_match_len("ab<｜", "<｜DSML｜"), "<｜".len());
        assert_eq!(partial_match_len("ab", "<｜DSML｜"), 0);
        assert_eq!(partial_match_len("<｜DSML｜", "<｜DSML｜"), 0);
    }
}
