//! Random and mutated bytes into the decoders and over a real socket: errors, never panics.

mod common;

use std::os::unix::net::UnixStream;

use common::*;
use ipc_proto::frame::{self, Header};
use ipc_proto::{FrameType, Request, WorkerConnection, WorkerServer, HEADER_LEN};
use rand::{Rng as _, SeedableRng as _};
use rand_xoshiro::Xoshiro256StarStar;

/// A seeded generator (xoshiro256**), so that failures reproduce.
fn seeded(seed: u64) -> Xoshiro256StarStar {
    Xoshiro256StarStar::seed_from_u64(seed)
}

fn bytes(rng: &mut Xoshiro256StarStar, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.random()).collect()
}

fn valid_eval() -> Vec<u8> {
    let mut p = Vec::new();
    let t: [&[u32]; 2] = [&[0, 2, 4], &[6]];
    frame::encode_eval(&mut p, 1, &expert_pairs(&t));
    p
}

/// Every decoder on one byte string.
fn decode_all(rng_bytes: &[u8]) {
    let l = limits();
    let experts = even_experts();
    let _ = frame::decode_hello(rng_bytes);
    let _ = frame::decode_setup(rng_bytes);
    if let Ok(r) = frame::decode_eval(1, rng_bytes, &l) {
        let _ = frame::validate_eval(&r, &experts);
        let n: usize = r.pairs.tokens().map(|ids| ids.len()).sum();
        assert_eq!(n, r.pairs.n_pairs());
    }
    let _ = frame::decode_eval_done(rng_bytes);
    let _ = frame::decode_stats(rng_bytes);
    let _ = frame::decode_error(rng_bytes);
    if rng_bytes.len() >= HEADER_LEN {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&rng_bytes[..HEADER_LEN]);
        if let Ok(h) = Header::decode(&h) {
            let _ = h.check_len(Some(&l));
            let _ = h.check_len(None);
        }
    }
}

#[test]
fn random_and_mutated_payloads_never_panic() {
    let mut rng = seeded(1);
    let seeds = [valid_eval(), {
        let mut p = Vec::new();
        frame::encode_hello(&mut p, &identity(), &even_experts());
        p
    }];
    let mut decoded_evals = 0;
    for i in 0..20_000 {
        let bytes = if i % 2 == 0 {
            let n = rng.random_range(0..160) as usize;
            bytes(&mut rng, n)
        } else {
            // Flip, overwrite or cut a valid payload.
            let mut b = seeds[rng.random_range(0..2) as usize].clone();
            for _ in 0..1 + rng.random_range(0..3) {
                let pos = rng.random_range(0..b.len() as u64) as usize;
                match rng.random_range(0..3) {
                    0 => b[pos] ^= 1 << rng.random_range(0..8),
                    1 => b[pos] = rng.random::<u8>(),
                    _ => b.truncate(pos),
                }
                if b.is_empty() {
                    break;
                }
            }
            b
        };
        decode_all(&bytes);
        if frame::decode_eval(1, &bytes, &limits()).is_ok() {
            decoded_evals += 1;
        }
    }
    // The mutations leave some evals decodable (e.g. a changed expert id): the decoder was reached.
    assert!(decoded_evals > 0);
}

#[test]
fn random_bytes_on_the_socket_never_panic_the_worker() {
    let mut rng = seeded(42);
    for i in 0..200 {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let mut raw = a.try_clone().expect("clone");
        let worker = std::thread::spawn(move || {
            let mut server = WorkerServer::handshake(b, &identity(), even_experts(), &opts()).expect("handshake");
            let mut served = 0u32;
            loop {
                match server.next_request() {
                    // Replies may fail: the daemon end is gone by then.
                    Ok(Request::Eval(r)) => {
                        served += 1;
                        if server.reply_eval(r.id, 0).is_err() {
                            return served;
                        }
                    }
                    Ok(Request::Ping { id, payload }) => {
                        if server.reply_pong(id, &payload).is_err() {
                            return served;
                        }
                    }
                    Ok(Request::Stats { id }) => {
                        if server.reply_stats(id, &Default::default()).is_err() {
                            return served;
                        }
                    }
                    Ok(Request::Shutdown { .. }) | Err(_) => return served,
                }
            }
        });
        let conn = WorkerConnection::handshake(a, limits(), &identity(), &opts()).expect("handshake");
        // A valid header with a random type/length and random payload, or pure noise.
        let mut bytes = if i % 2 == 0 {
            let ty = 1 + rng.random_range(0..12) as u16;
            let n = rng.random_range(0..200) as usize;
            let mut f = frame(ty, 1 + rng.random_range(0..3), &bytes(&mut rng, n));
            if rng.random_range(0..2) == 0 {
                let cut = rng.random_range(0..f.len() as u64) as usize;
                f.truncate(cut);
            }
            f
        } else {
            let n = rng.random_range(0..300) as usize;
            bytes(&mut rng, n)
        };
        if i % 5 == 0 {
            bytes = frame(FrameType::Eval as u16, 1, &valid_eval());
            let pos = HEADER_LEN + rng.random_range(0..valid_eval().len() as u64) as usize;
            bytes[pos] ^= 1 << rng.random_range(0..8);
        }
        write_raw(&mut raw, &bytes);
        drop(raw);
        drop(conn); // EOF after the bytes
        worker.join().expect("the worker must not panic");
    }
}
