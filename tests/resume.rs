//! A sequence's state copied out (`Sequence::checkpoint`, `Sequence::entries`) and written
//! into another sequence (`Sequence::restore`) continues bit for bit like the original, on
//! the tiny fixtures (CPU): at positions before, at and after the windows of every compression
//! ratio close and the raw window fills, restored into a sequence whose every row holds other
//! tokens' values; and a run resumed at a micro-batch boundary gives the same logits as the
//! run from scratch that the prompt cache replaces, also when the new prompt leaves the cached
//! one inside the cached part.
use std::path::PathBuf;

use graph::{Logits, Model, ModelOptions, Sequence};

/// One thread: the tests run many small steps, which a busy machine slows down most when
/// threads wait for each other.
fn load(gguf: &str, ubatch: usize) -> Model {
    let mut opts = ModelOptions { ubatch, threads: 1, ..ModelOptions::default() };
    opts.read.progress = false;
    Model::load(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(gguf), opts).expect("fixture model loads (run ./scripts/setup.sh)")
}

/// `n` token ids spread over the vocabulary (xorshift; any ids the model accepts will do).
fn tokens(n: usize, seed: u64, n_vocab: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n_vocab as u64) as u32
        })
        .collect()
}

/// A sequence whose ring, open-window rows and entries all hold values of other tokens,
/// further along than `pos`.
fn dirty_sequence(m: &mut Model, n_ctx: usize, pos: usize) -> Sequence {
    let mut seq = m.new_sequence(n_ctx).expect("sequence");
    let other = tokens((pos + 150).min(n_ctx), 99, m.n_vocab());
    m.forward(&mut seq, &other, Logits::Last).expect("dirty prefill");
    seq
}

/// Prefill `p` tokens, copy the state out, restore it into a dirty sequence, and continue
/// both with the same micro-batches and decode steps: every logit is identical.
fn restored_continues_like_the_original(gguf: &str, positions: &[usize]) {
    let mut m = load(gguf, 64);
    let n_ctx = 512;
    let toks = tokens(400, 7, m.n_vocab());
    for &p in positions {
        let mut orig = m.new_sequence(n_ctx).expect("sequence");
        m.forward(&mut orig, &toks[..p], Logits::Last).expect("prefix");
        let cp = orig.checkpoint();
        let entries = orig.entries(p).expect("entries");
        assert_eq!((cp.pos(), entries.pos()), (p, p));
        let mut copy = dirty_sequence(&mut m, n_ctx, p);
        copy.restore(&cp, &entries).expect("restore");
        assert_eq!(copy.pos(), p);
        let rest = &toks[p..p + 40];
        let a = m.forward(&mut orig, rest, Logits::All).expect("original continues");
        let b = m.forward(&mut copy, rest, Logits::All).expect("copy continues");
        assert!(a == b, "{gguf}: restored at {p}, the next 40 positions' logits differ");
        for &t in &toks[p + 40..p + 46] {
            let a = m.forward(&mut orig, &[t], Logits::Last).expect("original decodes");
            let b = m.forward(&mut copy, &[t], Logits::Last).expect("copy decodes");
            assert!(a == b, "{gguf}: restored at {p}, decode at {} differs", orig.pos() - 1);
        }
    }
}

/// Fixture A: ratios 0, 4, 128 and a raw window of 8; positions before, at and after the
/// window filling (8), ratio-4 windows closing, and the first ratio-128 window closing (128).
#[test]
fn a_restored_sequence_continues_bitwise_like_the_original() {
    restored_continues_like_the_original("ds4-tiny-a.f32.gguf", &[1, 3, 4, 5, 7, 8, 9, 63, 127, 128, 129, 130, 255, 256, 257]);
}

/// Fixture B: ratios 0, 8, 4.
#[test]
fn b_restored_sequence_continues_bitwise_like_the_original() {
    restored_continues_like_the_original("ds4-tiny-b.f32.gguf", &[2, 7, 8, 9, 15, 16, 17, 100, 200]);
}

/// What the prompt cache does: a prompt prefilled in micro-batches of `ubatch` from position 0
/// keeps a checkpoint at each micro-batch boundary; a later prompt sharing the first `shared`
/// tokens restores the last checkpoint at or before min(shared, its length − 1) and prefills
/// the rest in the same micro-batches. Its last logits equal those of the new prompt run from
/// scratch, bit for bit.
fn resumed_equals_from_scratch(m: &mut Model, cached: &[u32], prompt: &[u32], want: Logits) -> usize {
    let u = m.ubatch();
    let n_ctx = 512;
    let mut first = m.new_sequence(n_ctx).expect("sequence");
    let mut checkpoints = Vec::new();
    for chunk in cached.chunks(u) {
        m.forward(&mut first, chunk, want).expect("cached prompt");
        if first.pos().is_multiple_of(u) {
            checkpoints.push(first.checkpoint());
        }
    }
    let entries = first.entries(checkpoints.len() * u).expect("entries");
    let shared = cached.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    let resume = shared.min(prompt.len() - 1) / u * u;
    assert!(resume > 0, "the test needs a checkpoint to resume from");

    let mut scratch = m.new_sequence(n_ctx).expect("sequence");
    let want_logits = m.forward(&mut scratch, prompt, want).expect("from scratch");

    let mut resumed = dirty_sequence(m, n_ctx, resume);
    resumed.restore(&checkpoints[resume / u - 1], &entries).expect("restore");
    let got = m.forward(&mut resumed, &prompt[resume..], want).expect("resumed");
    let tail = match want {
        Logits::All => &want_logits[resume * m.n_vocab()..],
        Logits::Last => &want_logits[..],
    };
    assert!(got == tail, "resumed at {resume} (ubatch {u}, {shared} tokens shared): logits differ from the run from scratch");
    resume
}

/// Micro-batches of 127, 128 and 129 tokens put the resume point just before, at and just
/// after a boundary of the ratio-128 windows (and 3, 0, 1 tokens into a ratio-4 window).
#[test]
fn resuming_at_a_micro_batch_boundary_is_bitwise_a_run_from_scratch() {
    for (gguf, ubatches) in [("ds4-tiny-a.f32.gguf", [127, 128, 129]), ("ds4-tiny-b.f32.gguf", [63, 64, 65])] {
        for (i, u) in ubatches.into_iter().enumerate() {
            let mut m = load(gguf, u);
            let toks = tokens(330, 3, m.n_vocab());
            // every position's logits for one micro-batch size, the last one's for all
            let want = if i == 0 { Logits::All } else { Logits::Last };
            // The cached prompt is the start of the new one (the next turn of a chat).
            let resume = resumed_equals_from_scratch(&mut m, &toks[..300], &toks, want);
            assert_eq!(resume, 300 / u * u);
            // The same prompt again: at least its last token is run.
            let resume = resumed_equals_from_scratch(&mut m, &toks[..2 * u], &toks[..2 * u], Logits::Last);
            assert_eq!(resume, u);
        }
    }
}

/// The new prompt leaves the cached one at position 200: the run resumes at the last
/// checkpoint before it (192 with micro-batches of 64) and replays the tail, using the
/// entries copied at the cached prompt's last checkpoint (256).
#[test]
fn a_prompt_diverging_inside_the_cached_part_resumes_before_the_divergence() {
    let mut m = load("ds4-tiny-a.f32.gguf", 64);
    let cached = tokens(300, 5, m.n_vocab());
    let mut prompt = cached[..200].to_vec();
    prompt.extend(tokens(130, 6, m.n_vocab()));
    assert_ne!(prompt[200], cached[200]);
    for want in [Logits::Last, Logits::All] {
        assert_eq!(resumed_equals_from_scratch(&mut m, &cached, &prompt, want), 192);
    }
}

/// A checkpoint of the wrong size, entries that end before the checkpoint, or a checkpoint
/// beyond the context is refused before anything is written.
#[test]
fn a_mismatched_checkpoint_is_refused_and_the_sequence_kept() {
    let mut m = load("ds4-tiny-a.f32.gguf", 64);
    let toks = tokens(200, 9, m.n_vocab());
    let mut a = m.new_sequence(256).expect("sequence");
    m.forward(&mut a, &toks[..130], Logits::Last).expect("prefill");
    let (cp, entries) = (a.checkpoint(), a.entries(130).expect("entries"));
    let mut b = m.new_sequence(256).expect("sequence");
    m.forward(&mut b, &toks[..20], Logits::Last).expect("prefill");

    let mut short = cp.bytes().to_vec();
    short.pop();
    let err = b.restore(&graph::Checkpoint::from_bytes(130, short), &entries).expect_err("short checkpoint");
    assert!(err.to_string().contains("bytes"), "{err}");
    let early = a.entries(100).expect("entries");
    let err = b.restore(&cp, &early).expect_err("entries end before the checkpoint");
    assert!(err.to_string().contains("position 100"), "{err}");
    let mut small = m.new_sequence(64).expect("sequence");
    let err = small.restore(&cp, &entries).expect_err("beyond the context");
    assert!(err.to_string().contains("context of 64"), "{err}");
    assert!(a.entries(131).is_err(), "entries beyond the position");
    assert_eq!(b.pos(), 20, "a refused restore leaves the sequence as it was");
    // and the sequence still continues like one that never saw the attempts
    let mut c = m.new_sequence(256).expect("sequence");
    m.forward(&mut c, &toks[..20], Logits::Last).expect("prefill");
    let x = m.forward(&mut b, &toks[20..40], Logits::All).expect("b continues");
    let y = m.forward(&mut c, &toks[20..40], Logits::All).expect("c continues");
    assert!(x == y);
}


