//! Write a synthetic deepseek4 GGUF: `cargo run -p loader --example write_synth -- OUT.gguf
//! [tiny|medium] [VOCAB]` (used to make the fuzz seed corpus).
fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(out) = args.get(1) else {
        eprintln!("usage: write_synth OUT.gguf [tiny|medium] [VOCAB]");
        std::process::exit(2);
    };
    let mut spec = match args.get(2).map(String::as_str) {
        Some("medium") => loader::synth::SynthSpec::medium(),
        _ => loader::synth::SynthSpec::tiny(),
    };
    if let Some(v) = args.get(3) {
        spec.n_vocab = v.parse().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("VOCAB: {e}")))?;
    }
    let path = std::path::Path::new(out);
    loader::synth::SynthModel::new(&spec).write(path, true)?;
    match loader::Gguf::open(path) {
        Ok(g) => println!("tensor data starts at byte {}", g.data_offset()),
        Err(e) => eprintln!("{e}"),
    }
    Ok(())
}
