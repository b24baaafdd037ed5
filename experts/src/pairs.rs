//! [`ExpertPairs`]: per token of a micro-batch, the experts it is routed to.

use crate::error::{ExpertsError, Result};

/// Per token, a run of expert ids — its (token, expert) pairs — stored flat in the layout of
/// the `Eval` frame: token `t` has the pairs `offsets[t]..offsets[t + 1]` of `ids`. The
/// router's custom op fills it with the cold pairs, the `ColdExperts` executor takes it, a
/// worker's share is [`select`](Self::select)ed into another one, and the frame encoder
/// writes it as it is. The router weights stay in the graph, which weighs and sums every
/// slot's expert output in one place; an executor returns one output row per pair, in this
/// order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertPairs {
    /// `n_tokens + 1` ascending offsets, starting at 0.
    offsets: Vec<u32>,
    ids: Vec<u32>,
}

impl Default for ExpertPairs {
    fn default() -> Self {
        Self::new()
    }
}

impl ExpertPairs {
    /// No tokens.
    pub fn new() -> Self {
        ExpertPairs { offsets: vec![0], ids: Vec::new() }
    }

    /// From the per-token pair counts and the flat ids (the `Eval` payload); the counts must
    /// sum to the number of ids.
    pub fn from_counts(counts: &[u32], ids: Vec<u32>) -> Result<Self> {
        let mut offsets = Vec::with_capacity(counts.len() + 1);
        offsets.push(0u32);
        let mut sum = 0u64;
        for &c in counts {
            sum += u64::from(c);
            offsets.push(u32::try_from(sum).unwrap_or(u32::MAX));
        }
        if sum != ids.len() as u64 {
            return Err(ExpertsError::PairCounts { counted: sum, ids: ids.len() });
        }
        Ok(ExpertPairs { offsets, ids })
    }

    /// From per-token lists of expert ids.
    pub fn from_tokens(tokens: &[&[u32]]) -> Self {
        let mut p = ExpertPairs::new();
        for t in tokens {
            for &e in *t {
                p.push(e);
            }
            p.end_token();
        }
        p
    }

    /// Back to no tokens, keeping the allocations.
    pub fn clear(&mut self) {
        self.offsets.truncate(1);
        self.ids.clear();
    }

    /// Adds an expert to the token being written (the one after the last [`end_token`](Self::end_token)).
    pub fn push(&mut self, expert: u32) {
        self.ids.push(expert);
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

    /// The experts of token `t` (empty past the last token).
    pub fn token(&self, t: usize) -> &[u32] {
        match (self.offsets.get(t), self.offsets.get(t + 1)) {
            (Some(&a), Some(&b)) => &self.ids[a as usize..b as usize],
            _ => &[],
        }
    }

    /// Every token's experts, in order.
    pub fn tokens(&self) -> impl ExactSizeIterator<Item = &[u32]> + '_ {
        (0..self.n_tokens()).map(|t| self.token(t))
    }

    /// Pairs per token.
    pub fn counts(&self) -> impl ExactSizeIterator<Item = u32> + '_ {
        self.offsets.windows(2).map(|w| w[1] - w[0])
    }

    /// Every token's expert ids, one after the other: pair `p` is `ids()[p]`.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Writes into `out` the same tokens with only the pairs whose expert `keep` accepts (a
    /// worker's share), in the same order.
    pub fn select(&self, keep: impl Fn(u32) -> bool, out: &mut ExpertPairs) {
        out.clear();
        for t in self.tokens() {
            for &e in t {
                if keep(e) {
                    out.push(e);
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
        p.push(3);
        p.push(1);
        p.end_token();
        p.end_token();
        p.push(2);
        p.end_token();
        assert_eq!((p.n_tokens(), p.n_pairs()), (3, 3));
        assert_eq!(p.counts().collect::<Vec<_>>(), vec![2, 0, 1]);
        assert_eq!(p.token(0), &[3, 1]);
        assert!(p.token(1).is_empty() && p.token(7).is_empty());
        assert_eq!(p.tokens().map(|t| t.to_vec()).collect::<Vec<_>>(), vec![vec![3, 1], vec![], vec![2]]);

        let mut odd = ExpertPairs::new();
        p.select(|e| e % 2 == 1, &mut odd);
        assert_eq!(odd.counts().collect::<Vec<_>>(), vec![2, 0, 0]);
        assert_eq!(odd.ids(), &[3, 1]);

        assert_eq!(ExpertPairs::from_counts(&[2, 0, 1], p.ids().to_vec()).unwrap(), p);
        let e = ExpertPairs::from_counts(&[2, 2], vec![1, 2, 3]).unwrap_err().to_string();
        assert!(e.contains("sum to 4") && e.contains("3 expert ids"), "{e}");
        assert_eq!(ExpertPairs::from_tokens(&p.tokens().collect::<Vec<_>>()), p);
        p.clear();
        assert_eq!(p, ExpertPairs::new());
    }
}
