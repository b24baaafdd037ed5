//! A synthetic file written by ggml's GGUF writer opens, validates and loads.
use loader::synth::{SynthModel, SynthSpec};
use loader::{ModelFile, ReadMode, ReadOptions, TensorRequest};

#[test]
fn synthetic_tiny_model_opens_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    SynthModel::new(&SynthSpec::tiny()).write(&path, true).unwrap();
    let m = ModelFile::open(&path).unwrap();
    assert_eq!(m.config.n_layer, 4);
    assert_eq!(m.config.compress_ratios, vec![0, 0, 4, 128]);
    assert_eq!(m.config.n_vocab, 512);
    assert!(m.tensors.unused.is_empty());
    let cpu = ggml::Device::cpu().unwrap();
    let reqs: Vec<_> = m.tensors.iter().map(|t| TensorRequest::whole(&t.name)).collect();
    for mode in [ReadMode::Pread, ReadMode::Mmap] {
        let opts = ReadOptions { mode, chunk_bytes: 1 << 16, ..ReadOptions::default() };
        let loaded = loader::load_tensors(&m, &reqs, cpu.buffer_type(), &opts).unwrap();
        assert_eq!(loaded.stats.bytes, m.tensors.total_bytes());
    }
}
