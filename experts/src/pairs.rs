//! [`ExpertPairs`]: per token of a micro-batch, its (expert id, router weight) pairs.

use crate::error::{ExpertsError, Result};

/// Per token, a run of (expert id, weight) pairs, stored flat in the layout of the `Eval`
/// frame: token `t` has the pairs `offsets[t]..offsets[t + 1]` of `ids` and `weights`. The
/// router's custom op fills it, the `ColdExperts` executor takes it, a worker's share is
/// [`select`](Self::select)ed into another one, and the frame encoder writes it as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertPairs {
    /// `n_tokens + 1` ascending offsets, starting at 0.
    offsets: Vec<u32>,
    ids: Vec<u32>,
    weights: Vec<f32>,
}

/// One token's pairs: `ids[i]` with weight `weights[i]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertSlots<'a> {
    pub ids: &'a [u32],
    pub weights: &'a [f32],
}

impl Default for ExpertPairs {
    fn default() -> Self {
        Self::new()
    }
}

impl ExpertPairs {
    /// No tokens.
    pub fn new() -> Self {
        ExpertPairs { offsets: vec![0], ids: Vec::new(), weights: Vec::new() }
    }

    /// From the per-token pair counts and the flat ids and weights (the `Eval` payload);
    /// the counts must sum to the number of ids and of weights.
    pub fn from_counts(counts: &[u32], ids: Vec<u32>, weights: Vec<f32>) -> Result<Self> {
        let mut offsets = Vec::with_capacity(counts.len() + 1);
        offsets.push(0u32);
        let mut sum = 0u64;
        for &c in counts {
            sum += u64::from(c);
            offsets.push(u32::try_from(sum).unwrap_or(u32::MAX));
        }
        if sum != ids.len() as u64 || sum != weights.len() as u64 {
            return Err(ExpertsError::PairCounts { counted: sum, ids: ids.len(), weights: weights.len() });
        }
        Ok(ExpertPairs { offsets, ids, weights })
    }

    /// From per-token slices; each token's ids and weights must have the same length.
    pub fn from_tokens(tokens: &[ExpertSlots<'_>]) -> Result<Self> {
        let mut p = ExpertPairs::new();
        for (token, t) in tokens.iter().enumerate() {
            if t.ids.len() != t.weights.len() {
                return Err(ExpertsError::SlotLengths { token, ids: t.ids.len(), weights: t.weights.len() });
            }
            for (&e, &w) in t.ids.iter().zip(t.weights) {
                p.push(e, w);
            }
            p.end_token();
        }
        Ok(p)
    }

    /// Back to no tokens, keeping the allocations.
    pub fn clear(&mut self) {
        self.offsets.truncate(1);
        self.ids.clear();
        self.weights.clear();
    }

    /// Adds a pair to the token being written (the one after the last [`end_token`](Self::end_token)).
    pub fn push(&mut self, expert: u32, weight: f32) {
        self.ids.push(expert);
        self.weights.push(weight);
    }

    /// Closes the token being written (possibly without pairs).
    pub fn end_token(&mut self) {
        self.offsets.push(self.ids.len() as u32);
    }

    pub fn n_tokens(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn n_pairs(&self) -> usize {
        self.ids.len()
    }

    /// The pairs of token `t` (empty past the last token).
    pub fn token(&self, t: usize) -> ExpertSlots<'_> {
        match (self.offsets.get(t), self.offsets.get(t + 1)) {
            (Some(&a), Some(&b)) => ExpertSlots { ids: &self.ids[a as usize..b as usize], weights: &self.weights[a as usize..b as usize] },
            _ => ExpertSlots { ids: &[], weights: &[] },
        }
    }

    /// Every token's pairs, in order.
    pub fn tokens(&self) -> impl ExactSizeIterator<Item = ExpertSlots<'_>> + '_ {
        (0..self.n_tokens()).map(|t| self.token(t))
    }

    /// Pairs per token.
    pub fn counts(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.offsets.windows(2).map(|w| w[1] - w[0])
    }

    /// Every token's expert ids, one after the other.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The weights, in the order of [`ids`](Self::ids).
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }

    /// Writes into `out` the same tokens with only the pairs whose expert `keep` accepts (a
    /// worker's share).
    pub fn select(&self, keep: impl Fn(u32) -> bool, out: &mut ExpertPairs) {
        out.clear();
        for t in self.tokens() {
            for (&e, &w) in t.ids.iter().zip(t.weights) {
                if keep(e) {
                    out.push(e, w);
                }
            }
            out.end_token();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_counts_and_select() {
        let mut p = ExpertPairs::new();
        p.push(3, 0.5);
        p.push(1, 0.25);
        p.end_token();
        p.end_token();
        p.push(2, 1.0);
        p.end_token();
        assert_eq!((p.n_tokens(), p.n_pairs()), (3, 3));
        assert_eq!(p.counts().collect::<Vec<_>>(), vec![2, 0, 1]);
        assert_eq!(p.token(0), ExpertSlots { ids: &[3, 1], weights: &[0.5, 0.25] });
        assert!(p.token(1).ids.is_empty() && p.token(7).ids.is_empty());
        assert_eq!(p.tokens().map(|t| t.ids.to_vec()).collect::<Vec<_>>(), vec![vec![3, 1], vec![], vec![2]]);

        let mut odd = ExpertPairs::new();
        p.select(|e| e % 2 == 1, &mut odd);
        assert_eq!(odd.counts().collect::<Vec<_>>(), vec![2, 0, 0]);
        assert_eq!((odd.ids(), odd.weights()), (&[3, 1][..], &[0.5, 0.25][..]));

        assert_eq!(ExpertPairs::from_counts(&[2, 0, 1], p.ids().to_vec(), p.weights().to_vec()).unwrap(), p);
        let e = ExpertPairs::from_counts(&[2, 2], vec![1, 2, 3], vec![0.0; 3]).unwrap_err().to_string();
        assert!(e.contains("sum to 4") && e.contains("3 expert ids"), "{e}");
        assert_eq!(ExpertPairs::from_tokens(&p.tokens().collect::<Vec<_>>()).unwrap(), p);
        let e = ExpertPairs::from_tokens(&[ExpertSlots { ids: &[1, 2], weights: &[1.0] }]).unwrap_err().to_string();
        assert_eq!(e, "token 0: 2 expert ids but 1 weights");
        p.clear();
        assert_eq!(p, ExpertPairs::new());
    }
}
