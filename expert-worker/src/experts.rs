//! [`ExpertMap`]: per layer, a set of expert ids. The one type behind a worker's expert set
//! (`--experts SPEC`) and a placement's hot set, with its JSON form and the compact spec.
//!
//! # JSON
//!
//! An object from layer index (a decimal string) to the ascending list of expert ids of
//! that layer; layers absent from the object hold no expert:
//!
//! ```json
//! {"0": [0, 1, 2, 3], "1": [], "2": [7, 15]}
//! ```
//!
//! # Compact spec (`--experts SPEC`)
//!
//! * `all`: every expert of every layer; `none`: no expert;
//! * `IDS`: the same experts in every layer, e.g. `0-15` or `0,2,4-7`;
//! * `LAYERS:IDS;LAYERS:IDS;...`: per layer group, e.g. `0-2:0-7;3:1,5;4-5:all`. `LAYERS` is
//!   a list of layers or ranges, or `*` for every layer; `IDS` is a list of ids or inclusive
//!   ranges, or `all`; a later group adds to the experts an earlier group gave a layer;
//! * a path ending in `.json`: a file in the JSON form above.
//!
//! Every layer and expert id is checked against the model (`n_layer`, `n_expert`).

use std::path::Path;

use crate::error::{Result, WorkerError};
use crate::ranges::RangeError;

/// Per layer, the ascending, duplicate-free list of expert ids of a model with `n_layer`
/// layers of `n_expert` experts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertMap {
    pub(crate) n_expert: u32,
    pub(crate) layers: Vec<Vec<u32>>,
}

impl ExpertMap {
    /// No expert in any layer.
    pub fn empty(n_layer: u32, n_expert: u32) -> Self {
        ExpertMap { n_expert, layers: vec![Vec::new(); n_layer as usize] }
    }

    /// Every expert of every layer.
    pub fn full(n_layer: u32, n_expert: u32) -> Self {
        ExpertMap { n_expert, layers: vec![(0..n_expert).collect(); n_layer as usize] }
    }

    /// From per-layer id lists (any order, duplicates removed); checks every id.
    pub fn from_layers(n_expert: u32, layers: Vec<Vec<u32>>) -> Result<Self> {
        let mut m = ExpertMap::empty(layers.len() as u32, n_expert);
        for (l, ids) in layers.into_iter().enumerate() {
            for e in ids {
                m.insert(l as u32, e)?;
            }
        }
        Ok(m)
    }

    pub fn n_layer(&self) -> u32 {
        self.layers.len() as u32
    }

    pub fn n_expert(&self) -> u32 {
        self.n_expert
    }

    /// The experts of `layer`, ascending (empty past the last layer).
    pub fn layer(&self, layer: u32) -> &[u32] {
        self.layers.get(layer as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn layers(&self) -> &[Vec<u32>] {
        &self.layers
    }

    pub fn contains(&self, layer: u32, expert: u32) -> bool {
        self.layer(layer).binary_search(&expert).is_ok()
    }

    /// Adds `expert` to `layer` (no-op when present); refuses ids outside the model.
    pub fn insert(&mut self, layer: u32, expert: u32) -> Result<()> {
        let n_layer = self.n_layer();
        if expert >= self.n_expert {
            return Err(WorkerError::ExpertOutOfRange { layer, expert, n_expert: self.n_expert });
        }
        let ids = self.layers.get_mut(layer as usize).ok_or(WorkerError::LayerOutOfRange { layer, n_layer })?;
        if let Err(pos) = ids.binary_search(&expert) {
            ids.insert(pos, expert);
        }
        Ok(())
    }

    /// Removes every expert of `layer` (no-op past the last layer).
    pub fn clear_layer(&mut self, layer: u32) {
        if let Some(ids) = self.layers.get_mut(layer as usize) {
            ids.clear();
        }
    }

    /// The experts not in this map, per layer.
    pub fn complement(&self) -> ExpertMap {
        let layers = self.layers.iter().map(|ids| (0..self.n_expert).filter(|e| ids.binary_search(e).is_err()).collect()).collect();
        ExpertMap { n_expert: self.n_expert, layers }
    }

    /// Number of (layer, expert) pairs.
    pub fn len(&self) -> usize {
        self.layers.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The wire form of ipc-proto's handshake.
    pub fn to_expert_set(&self) -> Result<ipc_proto::ExpertSet> {
        let mut s = ipc_proto::ExpertSet::new(self.n_layer(), self.n_expert)?;
        for (l, ids) in self.layers.iter().enumerate() {
            for &e in ids {
                s.insert(l as u32, e)?;
            }
        }
        Ok(s)
    }

    /// The JSON form (see the module docs), layers without experts left out.
    pub fn to_json(&self) -> String {
        let mut obj = serde_json::Map::new();
        for (l, ids) in self.layers.iter().enumerate().filter(|(_, ids)| !ids.is_empty()) {
            obj.insert(l.to_string(), serde_json::Value::from(ids.clone()));
        }
        serde_json::Value::Object(obj).to_string()
    }

    /// Parses the JSON form for a model of `n_layer` layers of `n_expert` experts; `what`
    /// names the source in errors.
    pub fn from_json(text: &str, n_layer: u32, n_expert: u32, what: &str) -> Result<Self> {
        let bad = |reason: String| WorkerError::Json { what: what.to_string(), reason };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let obj = v.as_object().ok_or_else(|| bad(format!("expected an object of layer -> expert ids, found {}", kind(&v))))?;
        let mut m = ExpertMap::empty(n_layer, n_expert);
        for (k, ids) in obj {
            let layer = parse_layer_key(k, n_layer).map_err(bad)?;
            let list = ids.as_array().ok_or_else(|| bad(format!("layer {k}: expected an array of expert ids, found {}", kind(ids))))?;
            for id in list {
                let e = id
                    .as_u64()
                    .and_then(|e| u32::try_from(e).ok())
                    .ok_or_else(|| bad(format!("layer {k}: expected an expert id (integer >= 0), found {id}")))?;
                m.insert(layer, e)?;
            }
        }
        Ok(m)
    }

    /// Reads the JSON form from a file.
    pub fn read_json(path: &Path, n_layer: u32, n_expert: u32) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkerError::Io { what: "read", path: path.to_owned(), source })?;
        Self::from_json(&text, n_layer, n_expert, &path.display().to_string())
    }

    /// Writes the JSON form to a file.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()).map_err(|source| WorkerError::Io { what: "write", path: path.to_owned(), source })
    }

    /// Parses an `--experts` spec (see the module docs).
    pub fn parse_spec(spec: &str, n_layer: u32, n_expert: u32) -> Result<Self> {
        let s = spec.trim();
        if s.ends_with(".json") {
            return Self::read_json(Path::new(s), n_layer, n_expert);
        }
        let bad = |reason: String| WorkerError::Spec { spec: spec.to_string(), reason };
        match s {
            "all" => return Ok(ExpertMap::full(n_layer, n_expert)),
            "none" | "" => return Ok(ExpertMap::empty(n_layer, n_expert)),
            _ => {}
        }
        let mut m = ExpertMap::empty(n_layer, n_expert);
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
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A layer key of a JSON map: a decimal index below `n_layer`.
pub(crate) fn parse_layer_key(k: &str, n_layer: u32) -> Result<u32, String> {
    let layer: u32 = k.parse().map_err(|_| format!("expected a layer index as key, found {k:?}"))?;
    if layer >= n_layer {
        return Err(format!("layer {layer} out of range: the model has {n_layer} layers"));
    }
    Ok(layer)
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
        let m = ExpertMap::parse_spec("0-2,5", 2, 8).unwrap();
        assert_eq!(m.layers(), &[vec![0, 1, 2, 5], vec![0, 1, 2, 5]]);
        let m = ExpertMap::parse_spec("0:1,3; 2-3:6-7 ;*:0;1:all", 4, 8).unwrap();
        assert_eq!(m.layer(0), &[0, 1, 3]);
        assert_eq!(m.layer(1), &[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(m.layer(2), &[0, 6, 7]);
        assert_eq!(m.layer(3), &[0, 6, 7]);
        assert_eq!(ExpertMap::parse_spec("all", 3, 4).unwrap(), ExpertMap::full(3, 4));
        assert!(ExpertMap::parse_spec("none", 3, 4).unwrap().is_empty());
        assert_eq!(ExpertMap::parse_spec("0:", 2, 4).unwrap().len(), 0);
    }

    #[test]
    fn compact_errors_name_the_value() {
        let e = ExpertMap::parse_spec("0-16", 2, 16).unwrap_err().to_string();
        assert!(e.contains("expert 16 out of range: the model has 16"), "{e}");
        let e = ExpertMap::parse_spec("2:0", 2, 16).unwrap_err().to_string();
        assert!(e.contains("layer 2 out of range"), "{e}");
        let e = ExpertMap::parse_spec("5-3", 2, 16).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = ExpertMap::parse_spec("0:x", 2, 16).unwrap_err().to_string();
        assert!(e.contains("\"x\""), "{e}");
        let e = ExpertMap::parse_spec("0:1;2", 2, 16).unwrap_err().to_string();
        assert!(e.contains("LAYERS:IDS"), "{e}");
    }

    #[test]
    fn json_round_trip_and_errors() {
        let m = ExpertMap::from_layers(8, vec![vec![3, 1, 3], vec![], vec![7]]).unwrap();
        assert_eq!(m.to_json(), r#"{"0":[1,3],"2":[7]}"#);
        assert_eq!(ExpertMap::from_json(&m.to_json(), 3, 8, "t").unwrap(), m);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.json");
        m.write_json(&p).unwrap();
        assert_eq!(ExpertMap::parse_spec(p.to_str().unwrap(), 3, 8).unwrap(), m);
        let e = ExpertMap::from_json(r#"{"3":[1]}"#, 3, 8, "t").unwrap_err().to_string();
        assert!(e.contains("layer 3 out of range"), "{e}");
        let e = ExpertMap::from_json(r#"{"0":[8]}"#, 3, 8, "t").unwrap_err().to_string();
        assert!(e.contains("expert 8 of layer 0 out of range"), "{e}");
        let e = ExpertMap::from_json(r#"[1,2]"#, 3, 8, "t").unwrap_err().to_string();
        assert!(e.contains("found an array"), "{e}");
        let e = ExpertMap::from_json(r#"{"0":[-1]}"#, 3, 8, "t").unwrap_err().to_string();
        assert!(e.contains("found -1"), "{e}");
    }

    #[test]
    fn complement_and_wire_set() {
        let m = ExpertMap::from_layers(4, vec![vec![0, 2], vec![]]).unwrap();
        assert_eq!(m.complement().layers(), &[vec![1, 3], vec![0, 1, 2, 3]]);
        let s = m.to_expert_set().unwrap();
        assert_eq!(s.experts(0), vec![0, 2]);
        assert!(s.experts(1).is_empty());
    }
}
