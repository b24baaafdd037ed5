//! Python string methods and Jinja string filters that keep track of which characters are content
//! (see `taint.rs`). They run in both renders (with and without markers) so the two agree.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, State, Value};

use crate::taint::{Markers, Tainted};

/// The name of the context variable carrying the two marker characters of a marked render.
pub(crate) const MARKERS_VAR: &str = "__dflash_chat_markers__";

/// Python's `str.isspace` per character.
pub(crate) fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn op_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

#[derive(Clone, Copy)]
pub(crate) struct Mk(pub Option<Markers>);

impl Mk {
    pub fn from_state(state: &State) -> Mk {
        let v = state.lookup(MARKERS_VAR);
        let mut it = v.as_ref().and_then(|v| v.as_str()).map(|s| s.chars()).into_iter().flatten();
        match (it.next(), it.next()) {
            (Some(open), Some(close)) => Mk(Some(Markers { open, close })),
            _ => Mk(None),
        }
    }

    pub fn dec(&self, s: &str) -> Result<Tainted, Error> {
        match self.0 {
            Some(m) if m.is_marked(s) => m.decode(s).map_err(|e| op_err(e.to_string())),
            _ => Ok(Tainted { plain: s.to_string(), taint: vec![false; s.len()] }),
        }
    }

    pub fn enc(&self, t: &Tainted) -> Value {
        self.enc_range(t, 0..t.plain.len())
    }

    pub fn enc_range(&self, t: &Tainted, r: std::ops::Range<usize>) -> Value {
        match self.0 {
            Some(m) => Value::from(t.encode_range(m, r)),
            None => Value::from(&t.plain[r]),
        }
    }
}

/// Byte range left by Python's `strip`/`lstrip`/`rstrip` (chars `None` = whitespace).
fn strip_range(s: &str, chars: Option<&str>, left: bool, right: bool) -> std::ops::Range<usize> {
    let hit = |c: char| match chars {
        Some(set) => set.contains(c),
        None => py_space(c),
    };
    let mut start = 0;
    if left {
        start = s.char_indices().find(|&(_, c)| !hit(c)).map_or(s.len(), |(i, _)| i);
    }
    let mut end = s.len();
    if right {
        end = s[start..].char_indices().rev().find(|&(_, c)| !hit(c)).map_or(start, |(i, c)| start + i + c.len_utf8());
    }
    start..end
}

/// Byte ranges of Python's `str.split(sep, maxsplit)`.
fn split_ranges(s: &str, sep: Option<&str>, maxsplit: i64) -> Result<Vec<std::ops::Range<usize>>, Error> {
    let mut out = Vec::new();
    let limit = if maxsplit < 0 { usize::MAX } else { maxsplit as usize };
    match sep {
        Some("") => return Err(op_err("split(): empty separator")),
        Some(sep) => {
            let mut start = 0;
            for (i, _) in s.match_indices(sep) {
                if out.len() == limit {
                    break;
                }
                out.push(start..i);
                start = i + sep.len();
            }
            out.push(start..s.len());
        }
        None => {
            let mut i = 0;
            let n = s.len();
            loop {
                while i < n {
                    let c = s[i..].chars().next().unwrap_or(' ');
                    if !py_space(c) {
                        break;
                    }
                    i += c.len_utf8();
                }
                if i >= n {
                    break;
                }
                if out.len() == limit {
                    out.push(i..n);
                    break;
                }
                let mut j = i;
                while j < n {
                    let c = s[j..].chars().next().unwrap_or(' ');
                    if py_space(c) {
                        break;
                    }
                    j += c.len_utf8();
                }
                out.push(i..j);
                i = j;
            }
        }
    }
    Ok(out)
}

/// Python's `str.replace(old, new, count)`, the inserted text carrying the flags of `new`.
fn replace(s: &Tainted, old: &str, new: &Tainted, count: i64) -> Tainted {
    let limit = if count < 0 { usize::MAX } else { count as usize };
    let mut out = Tainted::default();
    let mut done = 0;
    if old.is_empty() {
        let bounds: Vec<usize> = s.plain.char_indices().map(|(i, _)| i).chain(std::iter::once(s.plain.len())).collect();
        let mut prev = 0;
        for &b in &bounds {
            out.push_range(s, prev..b);
            prev = b;
            if done < limit {
                out.push_range(new, 0..new.plain.len());
                done += 1;
            }
        }
        return out;
    }
    let mut start = 0;
    for (i, _) in s.plain.match_indices(old) {
        if done == limit {
            break;
        }
        out.push_range(s, start..i);
        out.push_range(new, 0..new.plain.len());
        start = i + old.len();
        done += 1;
    }
    out.push_range(s, start..s.plain.len());
    out
}

fn opt_str(v: Option<&Value>) -> Result<Option<String>, Error> {
    match v {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| op_err(format!("expected a string, found {v}"))),
    }
}

fn opt_int(v: Option<&Value>, default: i64) -> Result<i64, Error> {
    match v {
        None => Ok(default),
        Some(v) if v.is_none() => Ok(default),
        Some(v) => v.as_i64().ok_or_else(|| op_err(format!("expected an integer, found {v}"))),
    }
}

/// String methods handled here (the rest go to minijinja-contrib's pycompat). `Ok(None)`: not handled.
pub(crate) fn string_method(mk: Mk, s: &str, method: &str, args: &[Value]) -> Result<Option<Value>, Error> {
    let (pos, kw): (&[Value], Option<Kwargs>) = match args.last() {
        Some(l) if l.is_kwargs() => (&args[..args.len() - 1], Kwargs::try_from(l.clone()).ok()),
        _ => (args, None),
    };
    let kwarg = |name: &str, idx: usize| -> Option<Value> {
        pos.get(idx).cloned().or_else(|| kw.as_ref().and_then(|k| k.get::<Option<Value>>(name).ok().flatten()))
    };
    let v = match method {
        "strip" | "lstrip" | "rstrip" => {
            let t = mk.dec(s)?;
            let chars = opt_str(kwarg("chars", 0).as_ref())?;
            let chars = chars.map(|c| mk.dec(&c).map(|t| t.plain)).transpose()?;
            let r = strip_range(&t.plain, chars.as_deref(), method != "rstrip", method != "lstrip");
            mk.enc_range(&t, r)
        }
        "split" => {
            let t = mk.dec(s)?;
            let sep = opt_str(kwarg("sep", 0).as_ref())?.map(|c| mk.dec(&c).map(|t| t.plain)).transpose()?;
            let maxsplit = opt_int(kwarg("maxsplit", 1).as_ref(), -1)?;
            let parts = split_ranges(&t.plain, sep.as_deref(), maxsplit)?;
            Value::from(parts.into_iter().map(|r| mk.enc_range(&t, r)).collect::<Vec<_>>())
        }
        "startswith" | "endswith" => {
            let t = mk.dec(s)?;
            let Some(arg) = pos.first() else { return Err(op_err(format!("{method}() takes one argument"))) };
            let options: Vec<Value> = if arg.kind() == ValueKind::Seq { arg.try_iter()?.collect() } else { vec![arg.clone()] };
            let mut hit = false;
            for o in options {
                let o = o.as_str().ok_or_else(|| op_err(format!("{method}(): expected a string, found {o}")))?;
                let o = mk.dec(o)?.plain;
                hit |= if method == "startswith" { t.plain.starts_with(&o) } else { t.plain.ends_with(&o) };
            }
            Value::from(hit)
        }
        "replace" => {
            let t = mk.dec(s)?;
            let (Some(old), Some(new)) = (pos.first(), pos.get(1)) else {
                return Err(op_err("replace() takes two or three arguments"));
            };
            let (Some(old), Some(new)) = (old.as_str(), new.as_str()) else {
                return Err(op_err("replace(): expected strings"));
            };
            let count = opt_int(kwarg("count", 2).as_ref(), -1)?;
            mk.enc(&replace(&t, &mk.dec(old)?.plain, &mk.dec(new)?, count))
        }
        "upper" => mk.enc(&mk.dec(s)?.map_chars(char::to_uppercase)),
        "lower" => mk.enc(&mk.dec(s)?.map_chars(char::to_lowercase)),
        _ => return Ok(None),
    };
    Ok(Some(v))
}

/// The `trim` filter (Jinja2: `value.strip(chars)`).
pub(crate) fn trim_filter(state: &State, value: Value, chars: Option<String>) -> Result<Value, Error> {
    let mk = Mk::from_state(state);
    let s = value.to_string();
    let args: Vec<Value> = chars.into_iter().map(Value::from).collect();
    string_method(mk, &s, "strip", &args).map(|v| v.unwrap_or(value))
}

pub(crate) fn upper_filter(state: &State, value: Value) -> Result<Value, Error> {
    string_method(Mk::from_state(state), &value.to_string(), "upper", &[]).map(|v| v.unwrap_or(value))
}

pub(crate) fn lower_filter(state: &State, value: Value) -> Result<Value, Error> {
    string_method(Mk::from_state(state), &value.to_string(), "lower", &[]).map(|v| v.unwrap_or(value))
}

/// The `replace` filter (Jinja2: `value.replace(old, new, count)`).
pub(crate) fn replace_filter(
    state: &State,
    value: Value,
    old: String,
    new: String,
    count: Option<i64>,
) -> Result<Value, Error> {
    let args = [Value::from(old), Value::from(new), Value::from(count.unwrap_or(-1))];
    string_method(Mk::from_state(state), &value.to_string(), "replace", &args).map(|v| v.unwrap_or(value))
}

/// `length` / `count`: strings count their characters without markers.
pub(crate) fn length_filter(state: &State, value: Value) -> Result<Value, Error> {
    match value.as_str() {
        Some(s) => Ok(Value::from(Mk::from_state(state).dec(s)?.plain.chars().count())),
        None => minijinja::filters::length(&value).map(Value::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain_split<'a>(s: &'a str, sep: Option<&str>, maxsplit: i64) -> Vec<&'a str> {
        split_ranges(s, sep, maxsplit).unwrap().into_iter().map(|r| &s[r]).collect()
    }

    #[test]
    fn split_like_python() {
        // Expected values are Python 3.11's str.split results.
        assert_eq!(plain_split("  a b\t\nc  ", None, -1), ["a", "b", "c"]);
        assert_eq!(plain_split("  a b  c  ", None, 1), ["a", "b  c  "]);
        assert_eq!(plain_split("   ", None, -1), Vec::<&str>::new());
        assert_eq!(plain_split("a,b,,c,", Some(","), -1), ["a", "b", "", "c", ""]);
        assert_eq!(plain_split("a,b,,c", Some(","), 2), ["a", "b", ",c"]);
        assert_eq!(plain_split("", Some(","), -1), [""]);
        assert_eq!(plain_split("x</think>y</think>z", Some("</think>"), -1), ["x", "y", "z"]);
        assert!(split_ranges("a", Some(""), -1).is_err());
    }

    #[test]
    fn strip_like_python() {
        let s = " \t xyx \n";
        assert_eq!(&s[strip_range(s, None, true, true)], "xyx");
        assert_eq!(&s[strip_range(s, None, true, false)], "xyx \n");
        assert_eq!(&s[strip_range(s, None, false, true)], " \t xyx");
        assert_eq!(&"xxhixx"[strip_range("xxhixx", Some("x"), true, true)], "hi");
        assert_eq!(&"xxxx"[strip_range("xxxx", Some("x"), true, true)], "");
    }

    #[test]
    fn replace_like_python() {
        let t = |s: &str| Tainted { plain: s.to_string(), taint: vec![false; s.len()] };
        assert_eq!(replace(&t("a-b-c"), "-", &t("+"), -1).plain, "a+b+c");
        assert_eq!(replace(&t("a-b-c"), "-", &t("+"), 1).plain, "a+b-c");
        assert_eq!(replace(&t("ab"), "", &t("."), -1).plain, ".a.b.");
        assert_eq!(replace(&t("ab"), "", &t("."), 2).plain, ".a.b");
    }

    #[test]
    fn ops_keep_content_flags() {
        let m = crate::taint::Markers::choose(&Default::default()).unwrap();
        let mk = Mk(Some(m));
        let s = format!("<p>{}", m.wrap("  hi </think> there  "));
        let v = string_method(mk, &s, "split", &[Value::from("</think>")]).unwrap().unwrap();
        let parts: Vec<String> = v.try_iter().unwrap().map(|x| x.to_string()).collect();
        assert_eq!(parts, [format!("<p>{}", m.wrap("  hi ")), m.wrap(" there  ")]);
        let v = string_method(mk, &m.wrap("  hi  "), "strip", &[]).unwrap().unwrap();
        assert_eq!(v.as_str(), Some(m.wrap("hi").as_str()));
        let v = string_method(mk, &m.wrap("a<b"), "replace", &[Value::from("<"), Value::from("[")]).unwrap().unwrap();
        assert_eq!(v.as_str(), Some(format!("{}a{}[{}b{}", m.open, m.close, m.open, m.close).as_str()));
    }
}
