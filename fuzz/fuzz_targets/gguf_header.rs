//! Fuzz the whole header path: ggml's GGUF reader, metadata extraction, Ds4Config and the
//! tensor table validation. Any input must give Ok or an error, never a panic or an abort.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = loader::parse_bytes(data);
});
