//! Token sampling: logit_bias, repetition / frequency / presence penalties, then greedy or
//! temperature → top-k → top-p → min-p → a draw from a seeded PRNG (xoshiro256**, seeded
//! through SplitMix64; the order of HF transformers and vLLM). Logit rows past the tokenizer's vocabulary (padding rows of the output matrix) are
//! never sampled.
use std::collections::HashMap;

use rand::{Rng as _, SeedableRng as _};
use rand_xoshiro::Xoshiro256StarStar;

/// Sampling parameters of one request. Neutral values switch a stage off.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax; ties go to the lowest id).
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// CTRL-style: a seen token's positive logit is divided by it, a negative one multiplied. 1 = off.
    pub repetition_penalty: f32,
    /// Subtracted once per occurrence of a token in the penalty window. 0 = off.
    pub frequency_penalty: f32,
    /// Subtracted once from every token present in the penalty window. 0 = off.
    pub presence_penalty: f32,
    /// How many of the most recent tokens (prompt and generated) the penalties look at.
    pub penalty_last_n: usize,
    /// Added to the logits of these ids.
    pub logit_bias: Vec<(u32, f32)>,
    /// None = a fresh seed per request.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("invalid {field}: expected {expected}, found {found}")]
    Invalid { field: &'static str, expected: &'static str, found: String },
    #[error("logit_bias: {0}")]
    BiasTokenOutOfRange(#[from] graph::TokenOutOfRange),
}

fn check(field: &'static str, expected: &'static str, v: f32, ok: bool) -> Result<(), SamplingError> {
    if v.is_finite() && ok {
        Ok(())
    } else {
        Err(SamplingError::Invalid { field, expected, found: v.to_string() })
    }
}

impl SamplingParams {
    /// Checks ranges (OpenAI's where OpenAI has the parameter) and that every logit_bias id is
    /// below `n_vocab` (the tokenizer's vocabulary).
    pub fn validate(&self, n_vocab: usize) -> Result<(), SamplingError> {
        check("temperature", "a number in [0, 2]", self.temperature, (0.0..=2.0).contains(&self.temperature))?;
        check("top_p", "a number in (0, 1]", self.top_p, self.top_p > 0.0 && self.top_p <= 1.0)?;
        check("min_p", "a number in [0, 1]", self.min_p, (0.0..=1.0).contains(&self.min_p))?;
        check("repetition_penalty", "a number > 0", self.repetition_penalty, self.repetition_penalty > 0.0)?;
        let pen = |f, v: f32| check(f, "a number in [-2, 2]", v, (-2.0..=2.0).contains(&v));
        pen("frequency_penalty", self.frequency_penalty)?;
        pen("presence_penalty", self.presence_penalty)?;
        let ids: Vec<u32> = self.logit_bias.iter().map(|b| b.0).collect();
        graph::check_token_ids(&ids, n_vocab)?;
        for &(_, bias) in &self.logit_bias {
            check("logit_bias value", "a number in [-100, 100]", bias, (-100.0..=100.0).contains(&bias))?;
        }
        Ok(())
    }
}

/// The sampler of one request: parameters, PRNG and the penalty window.
pub struct Sampler {
    params: SamplingParams,
    n_valid: usize,
    rng: Xoshiro256StarStar,
    history: Vec<u32>,
}

impl Sampler {
    /// `n_valid`: the tokenizer's vocabulary size; logit rows from `n_valid` on are padding.
    pub fn new(params: SamplingParams, n_valid: usize) -> Sampler {
        let seed = params.seed.unwrap_or_else(rand::random);
        Sampler { params, n_valid, rng: Xoshiro256StarStar::seed_from_u64(seed), history: Vec::new() }
    }

    /// Tokens the penalties should see (the prompt, then every sampled token via `accept`).
    pub fn accept(&mut self, tokens: &[u32]) {
        self.history.extend_from_slice(tokens);
        let keep = self.params.penalty_last_n;
        if self.history.len() > keep.max(1) * 2 {
            self.history.drain(..self.history.len() - keep);
        }
    }

    fn window(&self) -> &[u32] {
        let n = self.params.penalty_last_n.min(self.history.len());
        &self.history[self.history.len() - n..]
    }

    /// Logits of the valid ids after logit_bias and penalties.
    pub fn adjusted(&self, logits: &[f32]) -> Vec<f32> {
        let n = self.n_valid.min(logits.len());
        let mut l = logits[..n].to_vec();
        for &(id, b) in &self.params.logit_bias {
            if let Some(x) = l.get_mut(id as usize) {
                *x += b;
            }
        }
        let p = &self.params;
        if p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for &t in self.window() {
                *counts.entry(t).or_default() += 1;
            }
            for (&t, &c) in &counts {
                let Some(x) = l.get_mut(t as usize) else { continue };
                if p.repetition_penalty != 1.0 {
                    *x = if *x > 0.0 { *x / p.repetition_penalty } else { *x * p.repetition_penalty };
                }
                *x -= c as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
        l
    }

    /// The distribution the next draw comes from, as (id, probability) sorted by probability
    /// (descending, then id); greedy gives one id with probability 1.
    pub fn distribution(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let l = self.adjusted(logits);
        if l.is_empty() {
            return Vec::new();
        }
        let p = &self.params;
        if p.temperature <= 0.0 {
            let mut best = 0usize;
            for (i, &x) in l.iter().enumerate() {
                if x > l[best] || l[best].is_nan() {
                    best = i;
                }
            }
            return vec![(best as u32, 1.0)];
        }
        let mut c: Vec<(u32, f32)> = l.iter().enumerate().filter(|(_, x)| !x.is_nan()).map(|(i, &x)| (i as u32, x / p.temperature)).collect();
        c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < c.len() {
            c.truncate(p.top_k);
        }
        let Some(&(_, max)) = c.first() else { return Vec::new() };
        let mut sum = 0f64;
        let mut probs: Vec<f64> = c
            .iter()
            .map(|&(_, x)| {
                let e = f64::from(x - max).exp();
                sum += e;
                e
            })
            .collect();
        probs.iter_mut().for_each(|q| *q /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0f64;
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= f64::from(p.top_p) {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * f64::from(p.min_p);
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let total: f64 = probs[..keep].iter().sum();
        c.truncate(keep);
        c.iter().zip(&probs).map(|(&(id, _), &q)| (id, (q / total) as f32)).collect()
    }

    /// Samples the next token from one row of logits and adds it to the penalty window.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let dist = self.distribution(logits);
        let id = if dist.len() <= 1 {
            dist.first().map(|d| d.0).unwrap_or(0)
        } else {
            let r: f64 = self.rng.random();
            let mut cum = 0f64;
            let mut pick = dist[dist.len() - 1].0;
            for &(id, q) in &dist {
                cum += f64::from(q);
                if r < cum {
                    pick = id;
                    break;
                }
            }
            pick
        };
        self.accept(&[id]);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(p: SamplingParams, n_valid: usize) -> Sampler {
        Sampler::new(p, n_valid)
    }

    fn close(got: &[(u32, f32)], want: &[(u32, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.0, w.0, "{got:?} vs {want:?}");
            assert!((f64::from(g.1) - w.1).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    // logits ln(1), ln(2), ln(3), ln(4): softmax = 0.1, 0.2, 0.3, 0.4
    fn ln_1234() -> Vec<f32> {
        [1f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect()
    }

    #[test]
    fn greedy_takes_the_argmax_and_lowest_id_on_ties() {
        let mut s = sampler(SamplingParams::default(), 4);
        assert_eq!(s.sample(&[0.0, 3.0, 1.0, 2.0]), 1);
        assert_eq!(s.sample(&[5.0, 1.0, 5.0, 2.0]), 0);
    }

    #[test]
    fn padding_rows_are_never_sampled() {
        // rows 3.. are padding: even with the largest logit they never win
        let mut g = sampler(SamplingParams::default(), 3);
        assert_eq!(g.sample(&[0.0, 1.0, 0.5, 100.0, 200.0]), 1);
        let p = SamplingParams { temperature: 1.0, seed: Some(1), ..SamplingParams::default() };
        let mut s = sampler(p, 3);
        let logits = [0.0, 0.0, 0.0, 50.0];
        for _ in 0..500 {
            assert!(s.sample(&logits) < 3);
        }
        assert_eq!(s.distribution(&logits).len(), 3);
    }

    #[test]
    fn temperature_scales_the_softmax() {
        let p = SamplingParams { temperature: 1.0, ..SamplingParams::default() };
        close(&sampler(p, 4).distribution(&ln_1234()), &[(3, 0.4), (2, 0.3), (1, 0.2), (0, 0.1)]);
        // T = 0.5 squares the odds: 1, 4, 9, 16 over 30
        let p = SamplingParams { temperature: 0.5, ..SamplingParams::default() };
        close(&sampler(p, 4).distribution(&ln_1234()), &[(3, 16.0 / 30.0), (2, 9.0 / 30.0), (1, 4.0 / 30.0), (0, 1.0 / 30.0)]);
    }

    #[test]
    fn top_k_top_p_min_p_truncate_and_renormalize() {
        let base = SamplingParams { temperature: 1.0, ..SamplingParams::default() };
        let p = SamplingParams { top_k: 2, ..base.clone() };
        close(&sampler(p, 4).distribution(&ln_1234()), &[(3, 4.0 / 7.0), (2, 3.0 / 7.0)]);
        // cumulative 0.4, 0.7, 0.9: top_p 0.69 keeps two, 0.71 keeps three
        let p = SamplingParams { top_p: 0.69, ..base.clone() };
        close(&sampler(p, 4).distribution(&ln_1234()), &[(3, 4.0 / 7.0), (2, 3.0 / 7.0)]);
        let p = SamplingParams { top_p: 0.71, ..base.clone() };
        close(&sampler(p, 4).distribution(&ln_1234()), &[(3, 4.0 / 9.0), (2, 3.0 / 9.0), (1, 2.0 / 9.0)]);
        // min_p 0.45: keep p >= 0.18; 0.6: keep p >= 0.24
        let p = SamplingParams { min_p: 0.45, ..base.clone() };
        close(&sampler(p, 4).distribution(&ln_1234()), &[(3, 4.0 / 9.0), (2, 3.0 / 9.0), (1, 2.0 / 9.0)]);
        let p = SamplingParams { min_p: 0.6, ..base.clone() };
        close(&sampler(p, 4).distribution(&ln_1234()), &[(3, 4.0 / 7.0), (2, 3.0 / 7.0)]);
        // top_p acts on the renormalized top-k: 4/7 >= 0.5 keeps one (0.4 of the full softmax would not)
        let p = SamplingParams { top_k: 2, top_p: 0.5, ..base };
        close(&sampler(p, 4).distribution(&ln_1234()), &[(3, 1.0)]);
    }

    #[test]
    fn penalties_and_logit_bias() {
        let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::default() };
        let mut s = sampler(p, 4);
        s.accept(&[0, 1]);
        assert_eq!(s.adjusted(&[4.0, -1.0, 3.0, 0.5]), vec![2.0, -2.0, 3.0, 0.5]);
        let p = SamplingParams { frequency_penalty: 0.5, presence_penalty: 0.25, ..SamplingParams::default() };
        let mut s = sampler(p, 4);
        s.accept(&[2, 2, 2, 1]);
        assert_eq!(s.adjusted(&[0.0, 0.0, 0.0, 0.0]), vec![0.0, -0.75, -1.75, 0.0]);
        // the window only covers the last penalty_last_n tokens
        let p = SamplingParams { presence_penalty: 1.0, penalty_last_n: 2, ..SamplingParams::default() };
        let mut s = sampler(p, 4);
        s.accept(&[0, 1, 2, 3, 3]);
        assert_eq!(s.adjusted(&[0.0; 4]), vec![0.0, 0.0, 0.0, -1.0]);
        let p = SamplingParams { logit_bias: vec![(0, 10.0), (3, -100.0)], ..SamplingParams::default() };
        let mut s = sampler(p, 4);
        assert_eq!(s.sample(&[0.0, 5.0, 1.0, 9.0]), 0);
        // greedy with a sampled token penalized away picks the next best
        let p = SamplingParams { presence_penalty: 2.0, ..SamplingParams::default() };
        let mut s = sampler(p, 3);
        assert_eq!(s.sample(&[1.0, 2.0, 0.5]), 1);
        assert_eq!(s.sample(&[1.0, 2.0, 0.5]), 0);
    }

    #[test]
    fn seeded_draws_repeat_and_follow_the_distribution() {
        let p = SamplingParams { temperature: 1.0, seed: Some(42), ..SamplingParams::default() };
        let logits = ln_1234();
        let run = |p: &SamplingParams| {
            let mut s = sampler(p.clone(), 4);
            (0..2000).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
        };
        let a = run(&p);
        assert_eq!(a, run(&p));
        assert_ne!(a, run(&SamplingParams { seed: Some(43), ..p.clone() }));
        // frequencies within 3 sigma of 0.1 / 0.2 / 0.3 / 0.4
        for (id, want) in [(0u32, 0.1f64), (1, 0.2), (2, 0.3), (3, 0.4)] {
            let f = a.iter().filter(|&&t| t == id).count() as f64 / a.len() as f64;
            let sigma = (want * (1.0 - want) / a.len() as f64).sqrt();
            assert!((f - want).abs() < 3.0 * sigma, "id {id}: {f} vs {want}");
        }
    }

    #[test]
    fn seeded_stream_is_xoshiro256starstar_through_splitmix64() {
        use rand::RngCore as _;
        // state {1, 2, 3, 4}: first outputs of the reference C implementation
        let state: Vec<u8> = [1u64, 2, 3, 4].iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut r = Xoshiro256StarStar::from_seed(state.try_into().expect("32 bytes"));
        assert_eq!([r.next_u64(), r.next_u64(), r.next_u64()], [11520, 0, 1509978240]);
        // seed 42 through SplitMix64 (the reference C seeding loop), and the draws in [0, 1)
        // as (u64 >> 11) / 2^53: the stream the sampler had before it used rand_xoshiro
        let mut r = Xoshiro256StarStar::seed_from_u64(42);
        assert_eq!([r.next_u64(), r.next_u64(), r.next_u64()], [1546998764402558742, 6990951692964543102, 12544586762248559009]);
        let mut r = Xoshiro256StarStar::seed_from_u64(42);
        let draws: [f64; 2] = [r.random(), r.random()];
        assert_eq!(draws, [0.08386297105988216, 0.3789802506626686]);
    }

    #[test]
    fn validation_names_the_bad_value() {
        let ok = SamplingParams::default();
        assert_eq!(ok.validate(10), Ok(()));
        let e = SamplingParams { logit_bias: vec![(10, 1.0)], ..ok.clone() }.validate(10).unwrap_err();
        assert_eq!(e.to_string(), "logit_bias: token id 10 (index 0) is outside the vocabulary [0, 10)");
        let e = SamplingParams { temperature: -1.0, ..ok.clone() }.validate(10).unwrap_err();
        assert!(e.to_string().contains("temperature") && e.to_string().contains("-1"), "{e}");
        assert!(SamplingParams { top_p: 0.0, ..ok.clone() }.validate(10).is_err());
        assert!(SamplingParams { presence_penalty: 3.0, ..ok }.validate(10).is_err());
    }
}
