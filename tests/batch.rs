//! Several sequences in one step (`Model::forward_batch`): each sequence's logits are the
//! bits it gets alone, on the F32 and MXFP4 fixtures (see `common/batching.rs`).
use std::path::PathBuf;

use graph::{Logits, Model, ModelOptions};

#[path = "common/batching.rs"]
mod batching;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn stream(name: &str) -> Vec<u32> {
    let mut npz = npyz::npz::NpzArchive::open(fixture(&format!("{name}.ref.npz"))).expect("reference npz (run ./scripts/setup.sh)");
    let arr = npz.by_name("tokens").expect("npz").expect("tokens");
    arr.into_vec::<i32>().expect("i32").into_iter().map(|t| t as u32).collect()
}

fn check(name: &str, gguf: &str) {
    let mut opts = ModelOptions::default();
    opts.read.progress = false;
    let mut m = Model::load(fixture(gguf), opts).expect("load");
    let stream = stream(name);
    for want in [Logits::All, Logits::Last] {
        batching::check_batched_equals_alone(&mut m, &stream, &batching::schedule(), want, gguf);
    }
}

#[test]
fn batched_equals_alone_a_f32() {
    check("ds4-tiny-a", "ds4-tiny-a.f32.gguf");
}

#[test]
fn batched_equals_alone_b_f32() {
    check("ds4-tiny-b", "ds4-tiny-b.f32.gguf");
}

#[test]
fn batched_equals_alone_c_f32() {
    check("ds4-tiny-c", "ds4-tiny-c.f32.gguf");
}

#[test]
fn batched_equals_alone_a_mxfp4() {
    check("ds4-tiny-a", "ds4-tiny-a.mxfp4.gguf");
}

/// A bad item (a token id out of range, a context overflow) fails the whole call before
/// any compute: no sequence moves.
#[test]
fn a_bad_item_fails_the_batch_before_compute() {
    let mut opts = ModelOptions::default();
    opts.read.progress = false;
    let mut m = Model::load(fixture("ds4-tiny-b.f32.gguf"), opts).expect("load");
    let n_vocab = m.n_vocab() as u32;
    let (mut a, mut b) = (m.new_sequence(8).expect("sequence"), m.new_sequence(8).expect("sequence"));
    let err = m.forward_batch(&mut [(&mut a, &[1, 2][..]), (&mut b, &[3, n_vocab][..])], Logits::Last).expect_err("id = n_vocab");
    assert!(err.to_string().contains(&n_vocab.to_string()), "{err}");
    let err = m.forward_batch(&mut [(&mut a, &[1, 2][..]), (&mut b, &[3; 9][..])], Logits::Last).expect_err("9 > 8");
    assert!(matches!(err, graph::GraphError::ContextOverflow { pos: 0, n: 9, n_ctx: 8 }), "{err:?}");
    assert_eq!((a.pos(), b.pos()), (0, 0));
    let out = m.forward_batch(&mut [(&mut a, &[1, 2][..]), (&mut b, &[][..])], Logits::Last).expect("an item without tokens");
    assert_eq!((out[0].len(), out[1].len(), a.pos(), b.pos()), (n_vocab as usize, 0, 2, 0));
}
