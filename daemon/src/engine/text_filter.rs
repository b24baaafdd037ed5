//! Generated text split into reasoning and content at `</think>`, cut at the first stop
//! string (also across token boundaries).
use super::Event;

/// Splits generated text into reasoning and content at `</think>` and stops at the first stop
/// string, holding back any tail that could still become a stop string or `</think>`.
#[derive(Debug)]
pub struct TextFilter {
    stops: Vec<String>,
    reasoning: bool,
    buf: String,
    pub stopped: bool,
    /// The stop string that ended the text, once one has.
    pub matched: Option<String>,
}

impl TextFilter {
    pub fn new(stops: Vec<String>, thinking: bool) -> TextFilter {
        TextFilter { stops, reasoning: thinking, buf: String::new(), stopped: false, matched: None }
    }

    fn emit(out: &mut Vec<Event>, reasoning: bool, text: &str) {
        if text.is_empty() {
            return;
        }
        match out.last_mut() {
            Some(Event::Text { reasoning: r, text: t }) if *r == reasoning => t.push_str(text),
            _ => out.push(Event::Text { reasoning, text: text.to_string() }),
        }
    }

    /// Adds decoded text; returns what can be sent now and whether a stop string was found
    /// (text from the stop string on is dropped).
    pub fn push(&mut self, text: &str) -> (Vec<Event>, bool) {
        let mut out = Vec::new();
        if self.stopped {
            return (out, true);
        }
        self.buf.push_str(text);
        loop {
            let think = if self.reasoning { self.buf.find(chat::THINK_END) } else { None };
            // the earliest stop string (the first listed among those found at one place)
            let stop = self.stops.iter().enumerate().filter_map(|(i, s)| self.buf.find(s.as_str()).map(|at| (at, i))).min();
            match (think, stop) {
                (Some(t), s) if !matches!(s, Some((s, _)) if s <= t) => {
                    Self::emit(&mut out, true, &self.buf[..t]);
                    self.buf.drain(..t + chat::THINK_END.len());
                    self.reasoning = false;
                }
                (_, Some((s, i))) => {
                    Self::emit(&mut out, self.reasoning, &self.buf[..s]);
                    self.buf.clear();
                    self.stopped = true;
                    self.matched = Some(self.stops[i].clone());
                    return (out, true);
                }
                _ => break,
            }
        }
        let hold = self.held_len();
        let cut = self.buf.len() - hold;
        Self::emit(&mut out, self.reasoning, &self.buf[..cut]);
        self.buf.drain(..cut);
        (out, false)
    }

    /// The longest tail of the buffer that is a proper prefix of a stop string (or of `</think>`
    /// while reasoning).
    fn held_len(&self) -> usize {
        let think = self.reasoning.then_some(chat::THINK_END);
        self.stops.iter().map(String::as_str).chain(think).map(|m| chat::partial_match_len(&self.buf, m)).max().unwrap_or(0)
    }

    /// End of generation: whatever was held back is text after all.
    pub fn flush(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        let buf = std::mem::take(&mut self.buf);
        Self::emit(&mut out, self.reasoning, &buf);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], thinking: bool, pieces: &[&str]) -> (Vec<(bool, String)>, bool) {
        let mut f = TextFilter::new(stops.iter().map(|s| s.to_string()).collect(), thinking);
        let mut out = Vec::new();
        let mut stopped = false;
        for p in pieces {
            let (ev, s) = f.push(p);
            out.extend(ev);
            if s {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.extend(f.flush());
        }
        // merge adjacent pieces of the same kind: the split points are not part of the contract
        let mut merged: Vec<(bool, String)> = Vec::new();
        for e in out {
            let Event::Text { reasoning, text } = e else { panic!("{e:?}") };
            match merged.last_mut() {
                Some((r, t)) if *r == reasoning => t.push_str(&text),
                _ => merged.push((reasoning, text)),
            }
        }
        (merged, stopped)
    }

    #[test]
    fn stop_string_across_token_boundaries() {
        let (out, stopped) = run(&["END"], false, &["abc E", "N", "D more"]);
        assert_eq!(out, vec![(false, "abc ".to_string())]);
        assert!(stopped);
        // a prefix that does not complete is released
        let (out, stopped) = run(&["END"], false, &["abc E", "N", "X"]);
        assert_eq!(out, vec![(false, "abc ENX".to_string())]);
        assert!(!stopped);
        // held text comes out at the end of generation
        let (out, _) = run(&["END"], false, &["abc EN"]);
        assert_eq!(out, vec![(false, "abc EN".to_string())]);
    }

    #[test]
    fn held_back_text_is_not_sent_early() {
        let mut f = TextFilter::new(vec!["\n\nUser:".into()], false);
        let (ev, _) = f.push("Hi\n");
        assert_eq!(ev, vec![Event::Text { reasoning: false, text: "Hi".into() }]);
        let (ev, _) = f.push("\nUs");
        assert_eq!(ev, vec![]);
        let (ev, stopped) = f.push("er: x");
        assert_eq!((ev, stopped), (vec![], true));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped) = run(&["zz", "b"], false, &["a", "bzz"]);
        assert_eq!((out, stopped), (vec![(false, "a".to_string())], true));
        let mut f = TextFilter::new(vec!["zz".into(), "b".into(), "bz".into()], false);
        assert!(f.push("abzz").1);
        assert_eq!(f.matched.as_deref(), Some("b"));
        let mut f = TextFilter::new(vec!["zz".into()], false);
        assert!(!f.push("abz").1);
        assert_eq!(f.matched, None);
    }

    #[test]
    fn thinking_splits_at_think_end() {
        let (out, _) = run(&[], true, &["let me", " see</th", "ink>The answer"]);
        assert_eq!(out, vec![(true, "let me see".to_string()), (false, "The answer".to_string())]);
        // without thinking, </think> is ordinary content
        let (out, _) = run(&[], false, &["a</think>b"]);
        assert_eq!(out, vec![(false, "a</think>b".to_string())]);
        // a stop string inside the reasoning stops there
        let (out, stopped) = run(&["STOP"], true, &["xSTOPy</think>z"]);
        assert_eq!((out, stopped), (vec![(true, "x".to_string())], true));
    }

    #[test]
    fn multibyte_text_is_held_on_char_boundaries() {
        let (out, stopped) = run(&["日本語"], false, &["こ日", "本", "x"]);
        assert_eq!((out, stopped), (vec![(false, "こ日本x".to_string())], false));
        let (out, stopped) = run(&["日本語"], false, &["こ日", "本語"]);
        assert_eq!((out, stopped), (vec![(false, "こ".to_string())], true));
    }
}
