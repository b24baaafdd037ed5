//! The handshake values checked against the hard caps and against each other.

use crate::error::{ProtoError, Result};
use crate::shm::ShmLayout;
use crate::types::{Limits, ModelIdentity, MAX_EMBD, MAX_EXPERTS, MAX_LAYERS, MAX_TOKENS};

impl ModelIdentity {
    /// Checks the shape fields against the hard caps (a worker's own identity, or a Hello).
    pub fn validate(&self) -> Result<()> {
        check_range("n_layer", self.n_layer, 1, MAX_LAYERS)?;
        check_range("n_expert", self.n_expert, 1, MAX_EXPERTS)?;
        check_range("n_embd", self.n_embd, 1, MAX_EMBD)
    }
}

impl Limits {
    /// Checks the limits on their own (caps, overflow of the shared region size).
    pub fn validate(&self) -> Result<()> {
        check_range("max_tokens", self.max_tokens, 1, MAX_TOKENS)?;
        check_range("n_embd", self.n_embd, 1, MAX_EMBD)?;
        check_range("max_experts_per_token", self.max_experts_per_token, 1, MAX_EXPERTS)?;
        ShmLayout::for_limits(self).map(|_| ())
    }

    /// Checks the limits against the worker's model: same `n_embd`, `max_experts_per_token`
    /// at most `n_expert`.
    pub fn validate_for(&self, identity: &ModelIdentity) -> Result<()> {
        self.validate()?;
        if self.n_embd != identity.n_embd {
            return Err(ProtoError::Mismatch {
                what: "limits n_embd (model n_embd)",
                expected: u64::from(identity.n_embd),
                found: u64::from(self.n_embd),
            });
        }
        check_range("max_experts_per_token", self.max_experts_per_token, 1, identity.n_expert)
    }
}

fn check_range(what: &'static str, v: u32, min: u32, max: u32) -> Result<()> {
    if v < min {
        return Err(ProtoError::Mismatch { what, expected: u64::from(min), found: u64::from(v) });
    }
    if v > max {
        return Err(ProtoError::OutOfRange { what, max: u64::from(max), found: u64::from(v) });
    }
    Ok(())
}
