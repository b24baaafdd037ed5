//! Every read path (O_DIRECT with its aligned staging, buffered `pread`, mmap) with several
//! thread counts and chunk sizes puts exactly the file's bytes into each tensor, for whole
//! tensors requested out of file order and for expert subsets, written in place or gathered
//! and set at once (`load_tensors_with` and `TensorWrites::Whole`, as for ggml's repacked CPU buffer). The reference
//! is the file itself, read with `std::fs::read`.
use std::path::Path;

use loader::synth::{SynthModel, SynthSpec};
use loader::{ModelFile, ReadMode, ReadOptions, TensorRequest};

fn tensor_bytes(t: *mut ggml::sys::ggml_tensor, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: the tensor is live and holds at least n bytes.
    unsafe { ggml::backend::tensor_get(t, &mut v, 0) };
    v
}

fn check_file(path: &Path) {
    let file = std::fs::read(path).unwrap();
    let m = ModelFile::open(path).unwrap();
    let cpu = ggml::Device::cpu().unwrap();
    // Reverse file order, so that the loader has to sort its reads.
    let mut infos: Vec<_> = m.tensors.iter().collect();
    infos.sort_by_key(|t| std::cmp::Reverse(t.offset));
    assert!(infos.iter().any(|t| t.offset % 4096 != 0), "some tensor starts off a 4096-byte boundary");
    let whole: Vec<_> = infos.iter().map(|t| TensorRequest::whole(&t.name)).collect();
    let expert = infos.iter().find(|t| t.name.ends_with("ffn_up_exps.weight")).expect("an expert tensor");
    let n_expert = expert.ne[2] as u32;
    let picks = vec![n_expert - 1, 0, n_expert / 2];
    let subset = [TensorRequest::experts(&expert.name, picks.clone())];
    let slice = expert.slice_bytes(2) as usize;

    for mode in [ReadMode::Direct, ReadMode::Pread, ReadMode::Mmap] {
        // 4096 + 100: chunks that split tensors off block boundaries.
        for (threads, chunk) in [(1, 4196), (3, 1 << 16), (8, 8 << 20)] {
            let opts = ReadOptions { mode, threads, chunk_bytes: chunk, progress: false };
            let what = format!("{mode:?}, {threads} threads, chunk {chunk}");
            let loaded = loader::load_tensors(&m, &whole, cpu.buffer_type(), &opts).unwrap();
            assert_eq!(loaded.stats.bytes, m.tensors.total_bytes(), "{what}");
            for t in &infos {
                let got = tensor_bytes(loaded.get(&t.name).unwrap(), t.nbytes as usize);
                assert!(got == file[t.offset as usize..(t.offset + t.nbytes) as usize], "{} ({what})", t.name);
            }
            for (how, sub) in [
                ("in place", loader::load_tensors(&m, &subset, cpu.buffer_type(), &opts).unwrap()),
                ("gathered", loader::load_tensors_with(&m, &subset, cpu.buffer_type(), &opts, loader::TensorWrites::Whole, &mut |_| {}).unwrap()),
            ] {
                assert_eq!(sub.stats.bytes, (slice * picks.len()) as u64, "{how} ({what})");
                let got = tensor_bytes(sub.get(&expert.name).unwrap(), slice * picks.len());
                for (i, &e) in picks.iter().enumerate() {
                    let at = expert.offset as usize + e as usize * slice;
                    assert!(got[i * slice..(i + 1) * slice] == file[at..at + slice], "expert {e}, {how} ({what})");
                }
            }
        }
    }
}

#[test]
fn every_read_mode_loads_the_files_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    SynthModel::new(&SynthSpec::tiny()).write(&path, true).unwrap();
    check_file(&path);
}

/// The same on tmpfs, which refuses O_DIRECT before Linux 6.6 (there the direct mode falls
/// back to buffered reads) and accepts it since.
#[test]
fn every_read_mode_loads_from_tmpfs() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm; skipped");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let path = dir.path().join("tiny.gguf");
    SynthModel::new(&SynthSpec::tiny()).write(&path, true).unwrap();
    check_file(&path);
}

/// A file truncated after its header was validated fails with an I/O error naming the
/// file, in every mode, instead of loading garbage.
#[test]
fn a_file_shortened_after_open_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    SynthModel::new(&SynthSpec::tiny()).write(&path, true).unwrap();
    let m = ModelFile::open(&path).unwrap();
    let last = m.tensors.iter().max_by_key(|t| t.offset).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(last.offset + last.nbytes / 2).unwrap();
    drop(f);
    let cpu = ggml::Device::cpu().unwrap();
    for mode in [ReadMode::Direct, ReadMode::Pread, ReadMode::Mmap] {
        let opts = ReadOptions { mode, threads: 2, chunk_bytes: 1 << 16, progress: false };
        let err = loader::load_tensors(&m, &[TensorRequest::whole(&last.name)], cpu.buffer_type(), &opts).err();
        let err = err.unwrap_or_else(|| panic!("{mode:?}: a truncated file loaded"));
        assert!(err.to_string().contains("tiny.gguf"), "{mode:?}: {err}");
        if mode == ReadMode::Mmap {
            assert!(err.to_string().contains("truncated after it was opened"), "{err}");
        }
    }
}

/// `load_tensors_with` reports the bytes read so far, growing, the last report being
/// every byte it loaded; the tensors hold the file's bytes as with `load_tensors`.
#[test]
fn progress_reports_grow_to_the_bytes_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    SynthModel::new(&SynthSpec::tiny()).write(&path, true).unwrap();
    let file = std::fs::read(&path).unwrap();
    let m = ModelFile::open(&path).unwrap();
    let cpu = ggml::Device::cpu().unwrap();
    let whole: Vec<_> = m.tensors.iter().map(|t| TensorRequest::whole(&t.name)).collect();
    let opts = ReadOptions { mode: ReadMode::Pread, threads: 1, chunk_bytes: 4196, progress: false };
    let mut reports = Vec::new();
    let loaded = loader::load_tensors_with(&m, &whole, cpu.buffer_type(), &opts, loader::TensorWrites::Ranges, &mut |b| reports.push(b)).unwrap();
    assert!(reports.windows(2).all(|w| w[0] < w[1]), "{reports:?}");
    assert_eq!(reports.last().copied(), Some(m.tensors.total_bytes()), "{reports:?}");
    for t in m.tensors.iter() {
        let got = tensor_bytes(loaded.get(&t.name).unwrap(), t.nbytes as usize);
        assert!(got == file[t.offset as usize..(t.offset + t.nbytes) as usize], "{}", t.name);
    }
}
