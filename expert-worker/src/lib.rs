//! expert-worker
