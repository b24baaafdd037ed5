//! Batched steps against the same sequences run alone: a schedule of steps, each a list of
//! (sequence, tokens) parts — prefill chunks beside decode tokens, sequences joining,
//! pausing, rejoining and leaving, in changing order — run through `forward_batch`, and each
//! sequence's chunks run alone through `forward` on a fresh sequence. Each sequence's
//! logits must be the same bits.
use graph::{Logits, Model};

/// Parts per step: (sequence, tokens). Sequence 0 prefills alone first (past the first
/// 128-token window), the others join with prefill chunks beside decode tokens.
pub fn schedule() -> Vec<Vec<(usize, usize)>> {
    let mut steps = vec![
        vec![(0, 125)],
        vec![(0, 1), (1, 13)],
        vec![(0, 1), (1, 1), (2, 7)],
        vec![(1, 1), (2, 1), (0, 1), (3, 9)],
        vec![(2, 1), (3, 1)],
        vec![(0, 1), (1, 6), (3, 1)],
    ];
    steps.extend(std::iter::repeat_n(vec![(0, 1), (1, 1), (2, 1), (3, 1)], 10));
    steps.extend(std::iter::repeat_n(vec![(3, 1), (0, 1), (1, 1)], 3));
    // A wide step: a 40-token chunk beside decode tokens.
    steps.push(vec![(0, 1), (2, 40), (3, 1)]);
    steps.push(vec![(0, 1), (2, 1), (3, 1)]);
    steps
}

/// Each sequence's tokens: `stream` from a different offset per sequence.
fn tokens_of(stream: &[u32], s: usize, n: usize) -> &[u32] {
    &stream[s * 7..s * 7 + n]
}

/// Runs `steps` batched and each sequence alone; returns per sequence (tokens compared,
/// max |Δ logit|) after asserting the bits are equal.
pub fn check_batched_equals_alone(m: &mut Model, stream: &[u32], steps: &[Vec<(usize, usize)>], want: Logits, what: &str) {
    let n_seq = steps.iter().flatten().map(|&(s, _)| s + 1).max().unwrap_or(0);
    let total: Vec<usize> = (0..n_seq).map(|s| steps.iter().flatten().filter(|p| p.0 == s).map(|p| p.1).sum()).collect();
    let n_ctx = total.iter().copied().max().unwrap_or(1);

    // Batched.
    let mut seqs: Vec<graph::Sequence> = (0..n_seq).map(|_| m.new_sequence(n_ctx).expect("sequence")).collect();
    let mut fed = vec![0usize; n_seq];
    let mut batched: Vec<Vec<f32>> = vec![Vec::new(); n_seq];
    for (i, step) in steps.iter().enumerate() {
        let mut slots: Vec<Option<&mut graph::Sequence>> = seqs.iter_mut().map(Some).collect();
        let mut items: Vec<(&mut graph::Sequence, &[u32])> = Vec::new();
        for &(s, n) in step {
            let seq = slots[s].take().expect("a sequence appears once per step");
            items.push((seq, &tokens_of(stream, s, total[s])[fed[s]..fed[s] + n]));
            fed[s] += n;
        }
        let out = m.forward_batch(&mut items, want).unwrap_or_else(|e| panic!("{what}: step {i}: {e}"));
        assert_eq!(out.len(), step.len());
        for (&(s, _), logits) in step.iter().zip(out) {
            batched[s].extend(logits);
        }
    }

    // Each sequence alone, in the same chunks.
    for s in 0..n_seq {
        let toks = tokens_of(stream, s, total[s]);
        let mut seq = m.new_sequence(n_ctx).expect("sequence");
        let mut alone = Vec::new();
        let mut p = 0;
        for &(_, n) in steps.iter().flatten().filter(|p| p.0 == s) {
            alone.extend(m.forward(&mut seq, &toks[p..p + n], want).expect("alone"));
            p += n;
        }
        assert_eq!(alone.len(), batched[s].len(), "{what}: sequence {s}: logit count");
        let d = alone.iter().zip(&batched[s]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let same = alone.iter().zip(&batched[s]).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what}: sequence {s}: batched logits differ from alone, max |Δ| {d:.3e}");
    }
    eprintln!("{what} ({want:?}): {n_seq} sequences over {} steps, batched logits equal alone to the bit", steps.len());
}
