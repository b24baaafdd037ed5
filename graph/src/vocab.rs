//! Token ids against a vocabulary: the one range check every entry point uses (the forward
//! pass, the engine, the HTTP API, `dflash logits`).

/// A token id outside `[0, n_vocab)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("token id {id} (index {index}) is outside the vocabulary [0, {n_vocab})")]
pub struct TokenOutOfRange {
    pub id: i64,
    /// Position of the id in the checked sequence.
    pub index: usize,
    pub n_vocab: usize,
}

/// The first id outside `[0, n_vocab)`, if any.
pub fn check_token_ids<T: Copy + Into<i64>>(ids: &[T], n_vocab: usize) -> Result<(), TokenOutOfRange> {
    match ids.iter().map(|&t| t.into()).enumerate().find(|&(_, id)| id < 0 || id as u64 >= n_vocab as u64) {
        Some((index, id)) => Err(TokenOutOfRange { id, index, n_vocab }),
        None => Ok(()),
    }
}

/// The ids as `u32` when every one lies in `[0, n_vocab)`.
pub fn token_ids<T: Copy + Into<i64>>(ids: &[T], n_vocab: usize) -> Result<Vec<u32>, TokenOutOfRange> {
    check_token_ids(ids, n_vocab)?;
    // in range, so below n_vocab ≤ usize::MAX; u32::try_from rejects what does not fit
    ids.iter()
        .map(|&t| t.into())
        .enumerate()
        .map(|(index, id)| u32::try_from(id).map_err(|_| TokenOutOfRange { id, index, n_vocab }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_outside_the_vocabulary_are_named_with_their_index() {
        assert_eq!(check_token_ids(&[0u32, 9], 10), Ok(()));
        assert_eq!(check_token_ids(&[0u32, 10, 11], 10), Err(TokenOutOfRange { id: 10, index: 1, n_vocab: 10 }));
        assert_eq!(check_token_ids(&[3i64, -1], 10), Err(TokenOutOfRange { id: -1, index: 1, n_vocab: 10 }));
        assert_eq!(check_token_ids::<u32>(&[], 0), Ok(()));
        assert_eq!(check_token_ids(&[0u32], 0), Err(TokenOutOfRange { id: 0, index: 0, n_vocab: 0 }));
        assert_eq!(token_ids(&[5i64, 0, 9], 10), Ok(vec![5, 0, 9]));
        assert_eq!(token_ids(&[i64::MAX], usize::MAX), Err(TokenOutOfRange { id: i64::MAX, index: 0, n_vocab: usize::MAX }));
        let e = token_ids(&[1i32, 129_280], 129_280).unwrap_err();
        assert_eq!(e.to_string(), "token id 129280 (index 1) is outside the vocabulary [0, 129280)");
    }
}
