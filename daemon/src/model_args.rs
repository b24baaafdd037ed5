//! Model flags shared by every subcommand that runs the model.
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use graph::{Model, ModelOptions};

#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// The deepseek4 GGUF.
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Device that runs the model (as `dflash devices` lists it, e.g. CPU or CUDA0).
    #[arg(long, default_value = "CPU")]
    pub device: String,
    /// CPU threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Largest micro-batch of one graph; prefill is split into micro-batches of this size.
    #[arg(short = 'u', long, default_value_t = 128)]
    pub ubatch: usize,
    /// Maximum context per sequence (default: what the command needs).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model> {
        let mut opts = ModelOptions { device: Some(self.device.clone()), ubatch: self.ubatch, ..ModelOptions::default() };
        if let Some(t) = self.threads {
            opts.threads = t;
        }
        Model::load(&self.model, opts).with_context(|| format!("loading {}", self.model.display()))
    }
}
