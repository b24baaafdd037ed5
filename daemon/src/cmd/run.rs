//! `dflash run`: one chat turn, generated text streamed to stdout, timings to stderr.
use std::io::Write as _;

use anyhow::{bail, Result};
use chat::{ChatMessage, MessageContent, TemplateVars};

use crate::engine::{Engine, EngineOptions, Event, FinishReason, GenRequest};
use crate::engine::prompt::ChatFormat;
use crate::engine::sampler::SamplingParams;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: crate::engine::model_args::ModelArgs,
    /// The user message.
    #[arg(short = 'p', long)]
    prompt: String,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// Think first (the reasoning is printed between <think> and </think>).
    #[arg(long)]
    think: bool,
    /// Largest number of tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    n_predict: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long = "temp", default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Seed of the sampler (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

fn message(role: &str, text: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: Some(MessageContent::Text(text.into())),
        reasoning_content: None,
        tool_calls: None,
        tool_call_id: None,
        name: None,
    }
}

pub fn run(a: Args) -> Result<()> {
    let model = a.model.load()?;
    let format = ChatFormat::from_metadata(&model.file.metadata)?;
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(message("system", s));
    }
    messages.push(message("user", &a.prompt));
    let vars = TemplateVars { thinking: a.think, ..TemplateVars::default() };
    let prompt = format.encode_chat(&messages, None, &vars, &[])?;
    let n_ctx = a.model.ctx_size.unwrap_or(prompt.len() + a.n_predict).min(model.config.n_ctx_train.max(1));
    if prompt.len() >= n_ctx {
        bail!("the prompt has {} tokens; the context of {n_ctx} leaves no room to generate", prompt.len());
    }
    let prefill_chunk = model.ubatch();
    let engine = Engine::start(
        model,
        format.tokenizer.clone(),
        EngineOptions { parallel: 1, n_ctx, queue_max: 0, expert_swap_bytes: a.model.expert_swap_bytes(), cache: Default::default(), prefill_chunk },
    )?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        seed: a.seed,
        ..SamplingParams::default()
    };
    let req = GenRequest { prompt, params, max_tokens: a.n_predict, stop: a.stop.clone(), thinking: a.think, ignore_eos: false };
    let mut h = engine.submit(req)?;
    let mut out = std::io::stdout().lock();
    let mut in_reasoning = false;
    while let Some(ev) = h.next_blocking() {
        match ev {
            Event::Text { reasoning, text } => {
                if reasoning && !in_reasoning {
                    write!(out, "<think>")?;
                } else if !reasoning && in_reasoning {
                    write!(out, "</think>")?;
                }
                in_reasoning = reasoning;
                write!(out, "{text}")?;
                out.flush()?;
            }
            Event::Error(e) => bail!("generation failed: {e}"),
            Event::Done(s) => {
                if in_reasoning {
                    write!(out, "</think>")?;
                }
                writeln!(out)?;
                out.flush()?;
                let t = s.timings;
                eprintln!(
                    "prompt: {} tokens in {:.1} ms ({:.1} tok/s); time to first token {:.1} ms; decode: {} tokens in {:.1} ms ({:.1} tok/s); finish: {}",
                    t.prompt_n,
                    t.prompt_ms,
                    t.prompt_per_second,
                    t.ttft_ms,
                    t.predicted_n,
                    t.predicted_ms,
                    t.predicted_per_second,
                    s.finish.as_str()
                );
                if s.finish == FinishReason::Cancelled {
                    bail!("generation was cancelled");
                }
                return Ok(());
            }
        }
    }
    bail!("the engine stopped without finishing the request")
}
