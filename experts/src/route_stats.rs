//! [`RouteStats`]: per layer, per expert, the number of tokens routed to it.
//!
//! # JSON
//!
//! An object from layer index (a decimal string) to the array of the layer's `n_expert`
//! counts; absent layers count zero:
//!
//! ```json
//! {"0": [12, 0, 3, 9], "1": [1, 1, 0, 7]}
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{ExpertsError, Result};

/// Routed-token counts per layer and expert: written by the graph (`--route-stats-out`), read
/// by the `profile:FILE` and `adaptive` placements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStats {
    counts: Vec<Vec<u64>>,
}

/// The JSON form (see the module docs).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct RouteStatsJson(BTreeMap<u32, Vec<u64>>);

impl RouteStats {
    /// Zero counts for `n_layer` layers of `n_expert` experts.
    pub fn new(n_layer: u32, n_expert: u32) -> Self {
        RouteStats { counts: vec![vec![0; n_expert as usize]; n_layer as usize] }
    }

    /// From per-layer count lists.
    pub fn from_counts(counts: Vec<Vec<u64>>) -> Self {
        RouteStats { counts }
    }

    /// Adds `n` routed tokens to (layer, expert); ignored when out of range.
    pub fn add(&mut self, layer: u32, expert: u32, n: u64) {
        if let Some(c) = self.counts.get_mut(layer as usize).and_then(|l| l.get_mut(expert as usize)) {
            *c += n;
        }
    }

    /// The count of (layer, expert); 0 when out of range.
    pub fn count(&self, layer: u32, expert: u32) -> u64 {
        self.counts.get(layer as usize).and_then(|l| l.get(expert as usize)).copied().unwrap_or(0)
    }

    /// The JSON form, every layer included.
    pub fn to_json(&self) -> String {
        let map = self.counts.iter().enumerate().map(|(l, c)| (l as u32, c.clone())).collect();
        // A map of integers to integer lists always serializes.
        serde_json::to_string(&RouteStatsJson(map)).unwrap_or_default()
    }

    /// Parses the JSON form for a model of `n_layer` layers of `n_expert` experts; `what`
    /// names the source in errors.
    pub fn from_json(text: &str, n_layer: u32, n_expert: u32, what: &str) -> Result<Self> {
        let bad = |reason: String| ExpertsError::Json { what: what.to_string(), reason };
        let RouteStatsJson(map) = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut s = RouteStats::new(n_layer, n_expert);
        for (layer, counts) in map {
            if layer >= n_layer {
                return Err(bad(format!("layer {layer} out of range: the model has {n_layer} layers")));
            }
            if counts.len() != n_expert as usize {
                return Err(bad(format!("layer {layer}: expected {n_expert} counts (one per expert), found {}", counts.len())));
            }
            s.counts[layer as usize] = counts;
        }
        Ok(s)
    }

    /// Reads the JSON form from a file.
    pub fn read_json(path: &Path, n_layer: u32, n_expert: u32) -> Result<Self> {
        let text = crate::error::read_text(path)?;
        Self::from_json(&text, n_layer, n_expert, &path.display().to_string())
    }

    /// Writes the JSON form to a file.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        crate::error::write_text(path, &self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_errors() {
        let mut s = RouteStats::new(2, 3);
        s.add(0, 2, 5);
        s.add(1, 0, 1);
        s.add(1, 0, 2);
        s.add(2, 0, 9); // out of range: ignored
        assert_eq!((s.count(0, 2), s.count(1, 0), s.count(2, 0)), (5, 3, 0));
        assert_eq!(s.to_json(), r#"{"0":[0,0,5],"1":[3,0,0]}"#);
        assert_eq!(RouteStats::from_json(&s.to_json(), 2, 3, "t").unwrap(), s);
        // Absent layers count zero; whitespace is free.
        let partial = RouteStats::from_json("{\n \"1\": [3, 0, 0]\n}\n", 2, 3, "t").unwrap();
        assert_eq!(partial, RouteStats::from_counts(vec![vec![0; 3], vec![3, 0, 0]]));
        let e = RouteStats::from_json(r#"{"0":[1,2]}"#, 2, 3, "stats.json").unwrap_err().to_string();
        assert_eq!(e, "stats.json: layer 0: expected 3 counts (one per expert), found 2");
        let e = RouteStats::from_json(r#"{"2":[1,2,3]}"#, 2, 3, "stats.json").unwrap_err().to_string();
        assert_eq!(e, "stats.json: layer 2 out of range: the model has 2 layers");
        let e = RouteStats::from_json(r#"{"0":[1,-2,3]}"#, 2, 3, "stats.json").unwrap_err().to_string();
        assert!(e.starts_with("stats.json: ") && e.contains("-2"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        s.write_json(&p).unwrap();
        assert_eq!(RouteStats::read_json(&p, 2, 3).unwrap(), s);
    }
}
