//! Content tracking through a template render.
//!
//! Every request string that reaches the template (message text, reasoning, tool-call names and
//! arguments, tool schemas, extra kwargs) is wrapped in two marker characters that occur nowhere in
//! the request or in the template: private-use code points, chosen per render. After rendering,
//! the markers split the output into template text and content. Filters and string methods the
//! template may apply to content (`trim`, `strip`, `split`, `replace`, `upper`, `length`, ...) are
//! implemented marker-aware in `jinja.rs` with the helpers here; anything else that changes the
//! output is caught by comparing with an unmarked render.

use std::collections::HashSet;

use crate::error::ChatError;

/// Whether a piece of the prompt came from the template (tokenize with special tokens parsed) or
/// from the request (tokenize as plain text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PieceKind {
    Template,
    Content,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptPiece {
    pub text: String,
    pub kind: PieceKind,
}

/// Pushes text onto a piece list, merging with the previous piece of the same kind.
pub(crate) fn push_piece(pieces: &mut Vec<PromptPiece>, text: &str, kind: PieceKind) {
    if text.is_empty() {
        return;
    }
    match pieces.last_mut() {
        Some(last) if last.kind == kind => last.text.push_str(text),
        _ => pieces.push(PromptPiece { text: text.to_string(), kind }),
    }
}

fn candidates() -> impl Iterator<Item = char> {
    // Supplementary private use areas B and A, then the BMP private use area.
    (0x100000u32..=0x10FFFD).rev().chain((0xF0000u32..=0xFFFFD).rev()).chain((0xE000u32..=0xF8FF).rev()).filter_map(char::from_u32)
}

/// Collects the marker candidates that occur in some text.
#[derive(Debug, Default)]
pub(crate) struct UsedChars(HashSet<char>);

impl UsedChars {
    pub fn add(&mut self, s: &str) {
        self.0.extend(s.chars().filter(|&c| ('\u{E000}'..='\u{F8FF}').contains(&c) || c >= '\u{F0000}'));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Markers {
    pub open: char,
    pub close: char,
}

impl Markers {
    pub fn choose(used: &UsedChars) -> Result<Markers, ChatError> {
        let mut free = candidates().filter(|c| !used.0.contains(c));
        match (free.next(), free.next()) {
            (Some(open), Some(close)) => Ok(Markers { open, close }),
            _ => Err(ChatError::NoFreeMarker),
        }
    }

    /// `s` marked as content; the empty string stays empty (and falsy in the template).
    pub fn wrap(&self, s: &str) -> String {
        if s.is_empty() {
            return String::new();
        }
        let mut out = String::with_capacity(s.len() + 8);
        out.push(self.open);
        out.push_str(s);
        out.push(self.close);
        out
    }

    pub fn is_marked(&self, s: &str) -> bool {
        s.contains([self.open, self.close])
    }

    /// Splits marked text into plain text and a per-byte content flag.
    pub fn decode(&self, s: &str) -> Result<Tainted, ChatError> {
        let mut t = Tainted { plain: String::with_capacity(s.len()), taint: Vec::with_capacity(s.len()) };
        let mut inside = false;
        for c in s.chars() {
            if c == self.open || c == self.close {
                let opening = c == self.open;
                if opening == inside {
                    return Err(ChatError::Untraceable(format!(
                        "unbalanced content markers (a {} marker {})",
                        if opening { "start" } else { "end" },
                        if opening { "inside content" } else { "outside content" }
                    )));
                }
                inside = opening;
                continue;
            }
            t.push(c, inside);
        }
        if inside {
            return Err(ChatError::Untraceable("content not closed (the template cut a content string)".into()));
        }
        Ok(t)
    }

    /// Splits marked output into pieces.
    pub fn pieces(&self, s: &str) -> Result<Vec<PromptPiece>, ChatError> {
        let t = self.decode(s)?;
        let mut pieces = Vec::new();
        let mut start = 0;
        for i in 1..=t.plain.len() {
            if i == t.plain.len() || (t.plain.is_char_boundary(i) && t.taint[i] != t.taint[start]) {
                let kind = if t.taint[start] { PieceKind::Content } else { PieceKind::Template };
                push_piece(&mut pieces, &t.plain[start..i], kind);
                start = i;
            }
        }
        Ok(pieces)
    }
}

/// Text with a content flag for every byte (all bytes of a char carry the same flag).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Tainted {
    pub plain: String,
    pub taint: Vec<bool>,
}

impl Tainted {
    pub fn push(&mut self, c: char, tainted: bool) {
        self.plain.push(c);
        self.taint.resize(self.plain.len(), tainted);
    }

    pub fn push_range(&mut self, other: &Tainted, range: std::ops::Range<usize>) {
        self.plain.push_str(&other.plain[range.clone()]);
        self.taint.extend_from_slice(&other.taint[range]);
    }

    pub fn any(&self) -> bool {
        self.taint.iter().any(|&t| t)
    }

    /// The byte range `range` of the plain text, re-marked.
    pub fn encode_range(&self, m: Markers, range: std::ops::Range<usize>) -> String {
        let mut out = String::with_capacity(range.len() + 8);
        let mut inside = false;
        for (i, c) in self.plain[range.clone()].char_indices() {
            let t = self.taint[range.start + i];
            if t != inside {
                out.push(if t { m.open } else { m.close });
                inside = t;
            }
            out.push(c);
        }
        if inside {
            out.push(m.close);
        }
        out
    }

    #[cfg(test)]
    pub fn encode(&self, m: Markers) -> String {
        self.encode_range(m, 0..self.plain.len())
    }

    /// Maps every char through `f`, the output chars inheriting the flag of their source char.
    pub fn map_chars<I: IntoIterator<Item = char>>(&self, f: impl Fn(char) -> I) -> Tainted {
        let mut out = Tainted::default();
        for (i, c) in self.plain.char_indices() {
            for o in f(c) {
                out.push(o, self.taint[i]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Markers {
        Markers::choose(&UsedChars::default()).unwrap()
    }

    #[test]
    fn wrap_and_split() {
        let m = m();
        let s = format!("<a>{}<b>{}{}", m.wrap("x<y"), m.wrap("z"), m.wrap(""));
        let p = m.pieces(&s).unwrap();
        assert_eq!(
            p,
            vec![
                PromptPiece { text: "<a>".into(), kind: PieceKind::Template },
                PromptPiece { text: "x<y".into(), kind: PieceKind::Content },
                PromptPiece { text: "<b>".into(), kind: PieceKind::Template },
                PromptPiece { text: "z".into(), kind: PieceKind::Content },
            ]
        );
    }

    #[test]
    fn markers_avoid_used_chars() {
        let first = m();
        let mut used = UsedChars::default();
        used.add(&format!("text {} more {}", first.open, first.close));
        let second = Markers::choose(&used).unwrap();
        assert!(second.open != first.open && second.open != first.close);
        assert!(second.close != first.open && second.close != first.close);
        assert_ne!(second.open, second.close);
    }

    #[test]
    fn unbalanced_is_an_error() {
        let m = m();
        let w = m.wrap("abc");
        assert!(matches!(m.pieces(&w[..w.len() - 4]), Err(ChatError::Untraceable(_))));
        assert!(matches!(m.pieces(&w[4..]), Err(ChatError::Untraceable(_))));
        assert!(matches!(m.pieces(&format!("{}{}", m.open, w)), Err(ChatError::Untraceable(_))));
    }

    #[test]
    fn encode_range_remarks() {
        let m = m();
        let t = m.decode(&format!("ab{}cd{}ef", m.open, m.close)).unwrap();
        assert_eq!(t.plain, "abcdef");
        assert_eq!(t.encode_range(m, 1..3), format!("b{}c{}", m.open, m.close));
        assert_eq!(t.encode_range(m, 3..6), format!("{}d{}ef", m.open, m.close));
        assert_eq!(t.encode(m), format!("ab{}cd{}ef", m.open, m.close));
    }
}
