//! The routed-expert tensors of a deepseek4 file, named in this one place for everything
//! that loads, places or computes experts: per layer `blk.L.ffn_down_exps.weight` and either
//! `blk.L.ffn_gate_exps.weight` + `blk.L.ffn_up_exps.weight` or their fused
//! `blk.L.ffn_gate_up_exps.weight` (gate rows first). Each is 3-D, one slice per expert
//! along the last dimension.

/// One of a layer's routed-expert tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpertPart {
    Gate,
    Up,
    Down,
    /// Gate and up in one tensor [n_embd, 2·ff, n_expert].
    GateUp,
}

impl ExpertPart {
    pub const ALL: [ExpertPart; 4] = [ExpertPart::Gate, ExpertPart::Up, ExpertPart::Down, ExpertPart::GateUp];

    /// The name without its layer (`ffn_gate_exps.weight`).
    pub fn suffix(self) -> &'static str {
        match self {
            ExpertPart::Gate => "ffn_gate_exps.weight",
            ExpertPart::Up => "ffn_up_exps.weight",
            ExpertPart::Down => "ffn_down_exps.weight",
            ExpertPart::GateUp => "ffn_gate_up_exps.weight",
        }
    }

    /// The tensor's name in layer `layer`.
    pub fn name(self, layer: usize) -> String {
        format!("blk.{layer}.{}", self.suffix())
    }

    /// The layer and part of a routed-expert tensor name; None for any other name.
    pub fn parse(name: &str) -> Option<(usize, ExpertPart)> {
        let (layer, suffix) = name.strip_prefix("blk.")?.split_once('.')?;
        let layer = layer.parse().ok()?;
        ExpertPart::ALL.into_iter().find(|p| p.suffix() == suffix).map(|p| (layer, p))
    }
}

#[cfg(test)]
mod tests {
    use super::ExpertPart;

    #[test]
    fn names_round_trip() {
        for p in ExpertPart::ALL {
            assert_eq!(ExpertPart::parse(&p.name(17)), Some((17, p)));
        }
        assert_eq!(ExpertPart::GateUp.name(3), "blk.3.ffn_gate_up_exps.weight");
        assert_eq!(ExpertPart::parse("blk.2.ffn_gate_shexp.weight"), None);
        assert_eq!(ExpertPart::parse("blk.x.ffn_up_exps.weight"), None);
        assert_eq!(ExpertPart::parse("output.weight"), None);
        assert_eq!(ExpertPart::parse("blk.1.ffn_up_exps.weight.extra"), None);
    }
}
