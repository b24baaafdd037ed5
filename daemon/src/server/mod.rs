//! The OpenAI-compatible HTTP service (axum on tokio) over the generation [`Engine`].
//!
//! Endpoints: `/health`, `/v1/models`, `/v1/chat/completions` (tool calls read from the model's
//! DSML blocks), `/v1/completions` (SSE streaming or not), Anthropic's `/v1/messages` and
//! `/v1/messages/count_tokens`, `/tokenize` and `/detokenize` (llama-server's shapes), `/metrics`
//! (Prometheus text). Errors are OpenAI error objects ([`ApiError`]), Anthropic ones on the
//! Anthropic endpoints. Any model name is accepted unless names are strict. With an API key,
//! everything but `/health` needs `Authorization: Bearer KEY` or `x-api-key: KEY`. Beyond
//! `queue_max` waiting requests, generation requests
//! get 503 with `Retry-After`. Rendering and tokenizing run on blocking threads, off the async
//! runtime. A shutdown signal stops accepting connections, lets in-flight requests finish
//! for the grace period, then cancels the rest.
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use subtle::ConstantTimeEq as _;

use crate::engine::prompt::ChatFormat;
use crate::engine::Engine;

mod anthropic;
mod api;
mod error;
mod handlers;
mod metrics;
mod reply;
mod stream;

pub use error::{AnthropicError, ApiError};
pub use metrics::Metrics;

/// Request limits.
pub struct Limits {
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Largest prompt in tokens.
    pub max_prompt: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
}

/// What every handler shares.
pub struct AppState {
    pub engine: Engine,
    pub format: ChatFormat,
    /// The name served in /v1/models and every response's `model`.
    pub model_id: String,
    /// The model's path, also accepted as `model` with strict names.
    pub model_path: String,
    /// Refuse (404) a `model` other than `model_id` or `model_path`; otherwise any is accepted.
    pub strict_model_names: bool,
    pub api_key: Option<String>,
    pub limits: Limits,
    /// Server start (Unix seconds).
    pub created: u64,
    pub next_id: AtomicU64,
    pub metrics: Metrics,
}

pub type St = Arc<AppState>;

/// Serves `state` on `host:port` until SIGTERM or SIGINT; then in-flight requests get
/// `grace` before the engine cancels them.
pub async fn serve(state: St, host: &str, port: u16, grace: Duration) -> Result<()> {
    // Handlers first: a SIGTERM that arrives once "listening" is printed must find them.
    let signals = signal_streams()?;
    let listener = tokio::net::TcpListener::bind((host, port)).await.with_context(|| format!("binding {host}:{port}"))?;
    let addr: SocketAddr = listener.local_addr()?;
    eprintln!(
        "dflash serve: model {} ({} parallel, context {} tokens) listening on http://{addr}",
        state.model_id, state.engine.info.parallel, state.engine.info.n_ctx
    );
    let app = router(state.clone());
    let shutdown = async move {
        wait_for_signal(signals).await;
        eprintln!("dflash serve: shutting down (in-flight requests get {} s)", grace.as_secs());
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            state.engine.cancel_all();
        });
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

type Signals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

fn signal_streams() -> Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok((term, int))
}

async fn wait_for_signal((mut term, mut int): Signals) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

pub fn router(state: St) -> Router {
    Router::new()
        .route("/health", get(handlers::health))
        .route("/v1/models", get(handlers::models))
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/tokenize", post(handlers::tokenize))
        .route("/detokenize", post(handlers::detokenize))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(state.limits.max_body))
        .layer(middleware::from_fn_with_state(state.clone(), require_key))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

fn endpoint(req: &Request) -> String {
    req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "other".into())
}

/// Counts every answer by endpoint and status (`dflash_http_requests_total`).
async fn count_requests(State(st): State<St>, req: Request, next: Next) -> Response {
    let path = endpoint(&req);
    let resp = next.run(req).await;
    st.metrics.count_http(&path, resp.status().as_u16());
    resp
}

/// With an API key set, every endpoint but /health needs `Authorization: Bearer KEY` or
/// `x-api-key: KEY` (answered in Anthropic's shape on the Anthropic endpoints).
async fn require_key(State(st): State<St>, req: Request, next: Next) -> Response {
    if endpoint(&req) != "/health" && !authorized(st.api_key.as_deref(), req.headers()) {
        return if req.uri().path().starts_with("/v1/messages") {
            AnthropicError(ApiError::unauthorized()).into_response()
        } else {
            ApiError::unauthorized().into_response()
        };
    }
    next.run(req).await
}

/// The bearer token, or else the `x-api-key` header, against the key, compared in constant time.
fn authorized(key: Option<&str>, headers: &HeaderMap) -> bool {
    let Some(key) = key else { return true };
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    match bearer.or(x_api_key) {
        Some(token) => bool::from(token.as_bytes().ct_eq(key.as_bytes())),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_header(name: header::HeaderName, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(v).expect("header value"));
        h
    }

    fn with_auth(v: &str) -> HeaderMap {
        with_header(header::AUTHORIZATION, v)
    }

    #[test]
    fn bearer_token_must_match_the_key_exactly() {
        assert!(authorized(None, &HeaderMap::new()));
        assert!(!authorized(Some("k3y"), &HeaderMap::new()));
        assert!(authorized(Some("k3y"), &with_auth("Bearer k3y")));
        for wrong in ["Bearer k3", "Bearer k3y ", "Bearer k3yy", "Bearer K3Y", "bearer k3y", "k3y", "Basic k3y", "Bearer "] {
            assert!(!authorized(Some("k3y"), &with_auth(wrong)), "{wrong:?}");
        }
    }

    #[test]
    fn x_api_key_must_match_the_key_exactly() {
        let x = |v: &str| with_header(header::HeaderName::from_static("x-api-key"), v);
        assert!(authorized(Some("k3y"), &x("k3y")));
        for wrong in ["k3", "k3y ", "K3Y", "Bearer k3y", ""] {
            assert!(!authorized(Some("k3y"), &x(wrong)), "{wrong:?}");
        }
        // a wrong bearer token is not rescued by a right x-api-key
        let mut h = with_auth("Bearer nope");
        h.insert("x-api-key", HeaderValue::from_static("k3y"));
        assert!(!authorized(Some("k3y"), &h));
    }
}
