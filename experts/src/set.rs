//! [`ExpertSet`]: per layer, a set of expert ids, and its JSON form.
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
//! Every layer and expert id is checked against the model (`n_layer`, `n_expert`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{ExpertsError, Result};

/// Per layer, the ascending, duplicate-free list of expert ids of a model with `n_layer`
/// layers of `n_expert` experts. Sorted lists (not a bitset): the graph loads a held layer's
/// experts in this order and numbers them by their position, the placement policies and the
/// worker walk them in order; the `Hello` frame carries a bitset, encoded by `ipc-proto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertSet {
    n_expert: u32,
    layers: Vec<Vec<u32>>,
}

/// The JSON form (see the module docs).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
struct SetJson(BTreeMap<u32, Vec<u32>>);

impl ExpertSet {
    /// No expert in any layer.
    pub fn empty(n_layer: u32, n_expert: u32) -> Self {
        ExpertSet { n_expert, layers: vec![Vec::new(); n_layer as usize] }
    }

    /// Every expert of every layer.
    pub fn full(n_layer: u32, n_expert: u32) -> Self {
        ExpertSet { n_expert, layers: vec![(0..n_expert).collect(); n_layer as usize] }
    }

    /// The experts `e` of each layer `l` of a model of `n_layer` layers of `n_expert`
    /// experts for which `held(l, e)` holds.
    pub fn from_fn(n_layer: u32, n_expert: u32, mut held: impl FnMut(u32, u32) -> bool) -> Self {
        let layers = (0..n_layer).map(|l| (0..n_expert).filter(|&e| held(l, e)).collect()).collect();
        ExpertSet { n_expert, layers }
    }

    /// From per-layer id lists (any order, duplicates removed); checks every id.
    pub fn from_layers(n_expert: u32, layers: Vec<Vec<u32>>) -> Result<Self> {
        let mut s = ExpertSet::empty(layers.len() as u32, n_expert);
        for (l, ids) in layers.into_iter().enumerate() {
            for e in ids {
                s.insert(l as u32, e)?;
            }
        }
        Ok(s)
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

    /// Every layer's experts, ascending.
    pub fn layers(&self) -> &[Vec<u32>] {
        &self.layers
    }

    /// Whether `layer` holds every one of the `n_expert` experts.
    pub fn is_full_layer(&self, layer: u32) -> bool {
        self.layer(layer).len() == self.n_expert as usize
    }

    pub fn contains(&self, layer: u32, expert: u32) -> bool {
        self.layer(layer).binary_search(&expert).is_ok()
    }

    /// Adds `expert` to `layer` (no-op when present); refuses ids outside the model.
    pub fn insert(&mut self, layer: u32, expert: u32) -> Result<()> {
        let n_layer = self.n_layer();
        if expert >= self.n_expert {
            return Err(ExpertsError::ExpertOutOfRange { layer, expert, n_expert: self.n_expert });
        }
        let ids = self.layers.get_mut(layer as usize).ok_or(ExpertsError::LayerOutOfRange { layer, n_layer })?;
        if let Err(pos) = ids.binary_search(&expert) {
            ids.insert(pos, expert);
        }
        Ok(())
    }

    /// Removes `expert` from `layer` (no-op when absent or past the last layer).
    pub fn remove(&mut self, layer: u32, expert: u32) {
        if let Some(ids) = self.layers.get_mut(layer as usize) {
            if let Ok(pos) = ids.binary_search(&expert) {
                ids.remove(pos);
            }
        }
    }

    /// Removes every expert of `layer` (no-op past the last layer).
    pub fn clear_layer(&mut self, layer: u32) {
        if let Some(ids) = self.layers.get_mut(layer as usize) {
            ids.clear();
        }
    }

    /// The experts not in this set, per layer.
    pub fn complement(&self) -> ExpertSet {
        let layers = self.layers.iter().map(|ids| (0..self.n_expert).filter(|e| ids.binary_search(e).is_err()).collect()).collect();
        ExpertSet { n_expert: self.n_expert, layers }
    }

    /// Number of (layer, expert) pairs.
    pub fn len(&self) -> usize {
        self.layers.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The JSON form (see the module docs), layers without experts left out.
    pub fn to_json(&self) -> String {
        let map = self.layers.iter().enumerate().filter(|(_, ids)| !ids.is_empty()).map(|(l, ids)| (l as u32, ids.clone())).collect();
        // A map of integers to integer lists always serializes.
        serde_json::to_string(&SetJson(map)).unwrap_or_default()
    }

    /// Parses the JSON form for a model of `n_layer` layers of `n_expert` experts; `what`
    /// names the source in errors.
    pub fn from_json(text: &str, n_layer: u32, n_expert: u32, what: &str) -> Result<Self> {
        let SetJson(map) = serde_json::from_str(text).map_err(|e| ExpertsError::Json { what: what.to_string(), reason: e.to_string() })?;
        let mut s = ExpertSet::empty(n_layer, n_expert);
        for (layer, ids) in map {
            if layer >= n_layer {
                return Err(ExpertsError::LayerOutOfRange { layer, n_layer });
            }
            for e in ids {
                s.insert(layer, e)?;
            }
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
    fn sets_and_complement() {
        let s = ExpertSet::from_layers(4, vec![vec![2, 0, 2], vec![]]).unwrap();
        assert_eq!(s.layers(), &[vec![0, 2], vec![]]);
        assert_eq!(s.complement().layers(), &[vec![1, 3], vec![0, 1, 2, 3]]);
        assert!(s.contains(0, 2) && !s.contains(0, 1) && !s.contains(5, 0));
        assert_eq!(s.len(), 2);
        assert!(ExpertSet::full(2, 4).is_full_layer(1) && !s.is_full_layer(0));
        assert_eq!(ExpertSet::from_fn(2, 4, |l, e| e == 2 * l), ExpertSet::from_layers(4, vec![vec![0], vec![2]]).unwrap());
        let e = ExpertSet::from_layers(4, vec![vec![4]]).unwrap_err().to_string();
        assert_eq!(e, "expert 4 of layer 0 out of range: the model has 4 experts");
        let e = ExpertSet::empty(2, 4).insert(2, 0).unwrap_err().to_string();
        assert_eq!(e, "layer 2 out of range: the model has 2 layers");
        let mut r = s.clone();
        r.remove(0, 2);
        r.remove(0, 1);
        r.remove(9, 0);
        assert_eq!(r.layers(), &[vec![0], vec![]]);
    }

    #[test]
    fn json_round_trip_and_errors() {
        let s = ExpertSet::from_layers(8, vec![vec![3, 1, 3], vec![], vec![7]]).unwrap();
        assert_eq!(s.to_json(), r#"{"0":[1,3],"2":[7]}"#);
        assert_eq!(ExpertSet::from_json(&s.to_json(), 3, 8, "t").unwrap(), s);
        // Layers in numeric order.
        let many = ExpertSet::from_layers(2, (0..11).map(|_| vec![1]).collect()).unwrap();
        assert!(many.to_json().starts_with(r#"{"0":[1],"1":[1],"2":[1],"#), "{}", many.to_json());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.json");
        s.write_json(&p).unwrap();
        assert_eq!(ExpertSet::read_json(&p, 3, 8).unwrap(), s);
        let e = ExpertSet::read_json(&dir.path().join("absent.json"), 3, 8).unwrap_err().to_string();
        assert!(e.starts_with("read ") && e.contains("absent.json"), "{e}");
        let e = ExpertSet::from_json(r#"{"3":[1]}"#, 3, 8, "t").unwrap_err().to_string();
        assert!(e.contains("layer 3 out of range"), "{e}");
        let e = ExpertSet::from_json(r#"{"0":[8]}"#, 3, 8, "t").unwrap_err().to_string();
        assert!(e.contains("expert 8 of layer 0 out of range"), "{e}");
        let e = ExpertSet::from_json(r#"[1,2]"#, 3, 8, "src.json").unwrap_err().to_string();
        assert!(e.starts_with("src.json: ") && e.contains("expected a map"), "{e}");
        let e = ExpertSet::from_json(r#"{"0":[-1]}"#, 3, 8, "t").unwrap_err().to_string();
        assert!(e.contains("-1"), "{e}");
        let e = ExpertSet::from_json(r#"{"x":[1]}"#, 3, 8, "t").unwrap_err().to_string();
        assert!(e.starts_with("t: ") && e.contains("expected key to be a number"), "{e}");
    }
}
