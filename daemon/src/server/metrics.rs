//! `/metrics`: Prometheus text from a `prometheus` registry holding the HTTP counters, the
//! engine's counters and gauges sampled when scraped.
use std::sync::atomic::Ordering;

use prometheus::{Encoder as _, Gauge, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::engine::Stats;

/// Every metric is named `dflash_*`.
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    queue_depth: IntGauge,
    active: IntGauge,
    prompt_tokens_per_second: Gauge,
    decode_tokens_per_second: Gauge,
    cache_ram_bytes: IntGauge,
    cache_disk_bytes: IntGauge,
    slots_busy: IntGauge,
}

impl Metrics {
    /// A registry with the engine's counters (`stats`) and the server's own metrics.
    /// `slots`: the engine's sequences (`--parallel`).
    pub fn new(stats: &Stats, slots: usize) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("dflash".into()), None)?;
        for c in stats.counters() {
            registry.register(Box::new(c))?;
        }
        for c in stats.float_counters() {
            registry.register(Box::new(c))?;
        }
        for h in stats.histograms() {
            registry.register(Box::new(h))?;
        }
        let http_requests = IntCounterVec::new(Opts::new("http_requests_total", "HTTP requests by endpoint and status."), &["endpoint", "status"])?;
        let queue_depth = IntGauge::new("queue_depth", "Requests waiting for a sequence.")?;
        let active = IntGauge::new("requests_active", "Requests being generated.")?;
        let prompt_tokens_per_second = Gauge::new("prompt_tokens_per_second", "Prefill throughput over all requests.")?;
        let decode_tokens_per_second = Gauge::new("decode_tokens_per_second", "Decode throughput over all requests.")?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(active.clone()))?;
        registry.register(Box::new(prompt_tokens_per_second.clone()))?;
        registry.register(Box::new(decode_tokens_per_second.clone()))?;
        let cache_ram_bytes = IntGauge::new("prompt_cache_ram_bytes", "Bytes of cached prompt state in memory.")?;
        let cache_disk_bytes = IntGauge::new("prompt_cache_disk_bytes", "Bytes of cached prompt state on disk.")?;
        registry.register(Box::new(cache_ram_bytes.clone()))?;
        registry.register(Box::new(cache_disk_bytes.clone()))?;
        let slots_total = IntGauge::new("slots_total", "Sequences the engine generates at the same time (--parallel).")?;
        slots_total.set(i64::try_from(slots).unwrap_or(i64::MAX));
        let slots_busy = IntGauge::new("slots_busy", "Slots generating a request (prefilling or decoding).")?;
        registry.register(Box::new(slots_total))?;
        registry.register(Box::new(slots_busy.clone()))?;
        Ok(Metrics {
            registry,
            http_requests,
            queue_depth,
            active,
            prompt_tokens_per_second,
            decode_tokens_per_second,
            cache_ram_bytes,
            cache_disk_bytes,
            slots_busy,
        })
    }

    pub fn count_http(&self, endpoint: &str, status: u16) {
        self.http_requests.with_label_values(&[endpoint, &status.to_string()]).inc();
    }

    /// Samples the gauges and encodes every metric: (content type, text).
    pub fn render(&self, stats: &Stats) -> Result<(String, String), prometheus::Error> {
        let per_s = |n: u64, t: f64| if t > 0.0 { n as f64 / t } else { 0.0 };
        self.queue_depth.set(stats.queue_depth.load(Ordering::Relaxed) as i64);
        self.active.set(stats.active.load(Ordering::Relaxed) as i64);
        self.slots_busy.set(stats.active.load(Ordering::Relaxed) as i64);
        self.cache_ram_bytes.set(stats.cache_ram_bytes.load(Ordering::Relaxed) as i64);
        self.cache_disk_bytes.set(stats.cache_disk_bytes.load(Ordering::Relaxed) as i64);
        self.prompt_tokens_per_second.set(per_s(stats.prompt_tokens.get(), stats.prompt_seconds.get()));
        // every request's first token comes with its prefill: decode rates count the rest
        let ended = stats.requests_finished.get() + stats.requests_cancelled.get();
        self.decode_tokens_per_second.set(per_s(stats.completion_tokens.get().saturating_sub(ended), stats.decode_seconds.get()));
        let encoder = TextEncoder::new();
        let mut out = Vec::new();
        encoder.encode(&self.registry.gather(), &mut out)?;
        let text = String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))?;
        Ok((encoder.format_type().to_string(), text))
    }
}
