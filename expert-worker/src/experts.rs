//! The `--experts SPEC` of a worker: which experts of the shared [`ExpertSet`] type it
//! serves.
//!
//! * `all`: every expert of every layer; `none`: no expert;
//! * `IDS`: the same experts in every layer, e.g. `0-15` or `0,2,4-7`;
//! * `LAYERS:IDS;LAYERS:IDS;...`: per layer group, e.g. `0-2:0-7;3:1,5;4-5:all`. `LAYERS` is
//!   a list of layers or ranges, or `*` for every layer; `IDS` is a list of ids or inclusive
//!   ranges, or `all`; a later group adds to the experts an earlier group gave a layer;
//! * a path ending in `.json`: a file in the JSON form of [`ExpertSet`] (layer → ids).
//!
//! Every layer and expert id is checked against the model (`n_layer`, `n_expert`).

use std::path::Path;

use experts::ExpertSet;

use crate::error::{Result, WorkerError};
use crate::ranges::RangeError;

/// Parses an `--experts` spec (see the module docs).
pub fn parse_spec(spec: &str, n_layer: u32, n_expert: u32) -> Result<ExpertSet> {
    let s = spec.trim();
    if s.ends_with(".json") {
        return Ok(ExpertSet::read_json(Path::new(s), n_layer, n_expert)?);
    }
    let bad = |reason: String| WorkerError::Spec { spec: spec.to_string(), reason };
    match s {
        "all" => return Ok(ExpertSet::full(n_layer, n_expert)),
        "none" | "" => return Ok(ExpertSet::empty(n_layer, n_expert)),
        _ => {}
    }
    let mut m = ExpertSet::empty(n_layer, n_expert);
    if !s.contains(':') {
        let ids = parse_list(s, n_expert, "expert").map_err(bad)?;
        for l in 0..n_layer {
            for &e in &ids {
                m.insert(l, e)?;
            }
        }
        return Ok(m);
    }
    for group in s.split(';').map(str::trim).filter(|g| !g.is_empty()) {
        let (layers, ids) = group.split_once(':').ok_or_else(|| bad(format!("group {group:?}: expected LAYERS:IDS")))?;
        let layers = match layers.trim() {
            "*" => (0..n_layer).collect(),
            l => parse_list(l, n_layer, "layer").map_err(bad)?,
        };
        let ids = match ids.trim() {
            "all" => (0..n_expert).collect(),
            "" | "none" => Vec::new(),
            i => parse_list(i, n_expert, "expert").map_err(bad)?,
        };
        for &l in &layers {
            for &e in &ids {
                m.insert(l, e)?;
            }
        }
    }
    Ok(m)
}

/// `a,b-c,...` (inclusive ranges) of values below `bound`.
fn parse_list(s: &str, bound: u32, what: &str) -> Result<Vec<u32>, String> {
    let values = crate::ranges::parse_ranges(s, bound as usize).map_err(|e| match e {
        RangeError::NotANumber(t) => format!("expected a {what} id or range, found {t:?}"),
        RangeError::Backwards(r) => format!("{what} range {r:?} is empty (start after end)"),
        RangeError::TooLarge(v) => format!("{what} {v} out of range: the model has {bound}"),
    })?;
    // Below `bound`, a u32.
    Ok(values.into_iter().map(|v| v as u32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_forms() {
        let m = parse_spec("0-2,5", 2, 8).unwrap();
        assert_eq!(m.layers(), &[vec![0, 1, 2, 5], vec![0, 1, 2, 5]]);
        let m = parse_spec("0:1,3; 2-3:6-7 ;*:0;1:all", 4, 8).unwrap();
        assert_eq!(m.layer(0), &[0, 1, 3]);
        assert_eq!(m.layer(1), &[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(m.layer(2), &[0, 6, 7]);
        assert_eq!(m.layer(3), &[0, 6, 7]);
        assert_eq!(parse_spec("all", 3, 4).unwrap(), ExpertSet::full(3, 4));
        assert!(parse_spec("none", 3, 4).unwrap().is_empty());
        assert_eq!(parse_spec("0:", 2, 4).unwrap().len(), 0);
    }

    #[test]
    fn compact_errors_name_the_value() {
        let e = parse_spec("0-16", 2, 16).unwrap_err().to_string();
        assert!(e.contains("expert 16 out of range: the model has 16"), "{e}");
        let e = parse_spec("2:0", 2, 16).unwrap_err().to_string();
        assert!(e.contains("layer 2 out of range"), "{e}");
        let e = parse_spec("5-3", 2, 16).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = parse_spec("0:x", 2, 16).unwrap_err().to_string();
        assert!(e.contains("\"x\""), "{e}");
        let e = parse_spec("0:1;2", 2, 16).unwrap_err().to_string();
        assert!(e.contains("LAYERS:IDS"), "{e}");
    }

    #[test]
    fn json_file_spec() {
        let m = ExpertSet::from_layers(8, vec![vec![3, 1], vec![], vec![7]]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.json");
        m.write_json(&p).unwrap();
        assert_eq!(parse_spec(p.to_str().unwrap(), 3, 8).unwrap(), m);
        let e = parse_spec(p.to_str().unwrap(), 2, 8).unwrap_err().to_string();
        assert!(e.contains("layer 2 out of range"), "{e}");
    }
}
