//! Speculative decoding for amusd.
//!
//! Split as mistral.rs splits it: a [`Drafter`] proposes tokens, a [`Verifier`] checks them in one
//! batched forward pass, and [`policy`] decides what is committed. The same three pieces run
//! autoregressive decoding (a verifier with nothing to check), synchronous speculative decoding
//! ([`generate::speculative`]) and the two AMUSD worker processes ([`worker`]), so the strategies
//! cannot drift apart: their outputs are identical by construction, given the batch-invariant
//! forward pass of `amusd-model` and a [`sampling`] whose choice at a position depends only on the
//! logits there, the seed and the position.

pub mod constraint;
pub mod decoder;
pub mod dry;
/// A deterministic fake model for protocol tests (the `fake` feature; always in this crate's tests).
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod generate;
pub mod history;
pub mod logit_bias;
pub mod logprobs;
pub mod lookup;
pub mod penalty;
mod philox;
pub mod policy;
pub mod run_worth;
pub mod sampling;
pub mod split;
pub mod worker;

pub use decoder::{Decoder, Drafter, LlamaDecoder, Verifier};
pub use generate::{Generation, Metrics};
pub use policy::{Finish, StopCriteria};
pub use sampling::{
    Dry, LogitBias, Penalties, RequestSampling, Sampler, SamplingError, SamplingParams,
};

/// Errors of the decoding loops.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(transparent)]
    Model(#[from] amusd_model::ModelError),
    #[error(transparent)]
    Shm(#[from] amusd_shm::ShmError),
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Lookup(#[from] lookup::BadRange),
    /// A grammar that does not compile, or one this process cannot follow.
    #[error("{0}")]
    Grammar(String),
    #[cfg(any(test, feature = "fake"))]
    #[error("bad fake model spec '{0}': expected fake:KEY=VALUE,... with keys vocab, seed, err, us, eos")]
    FakeSpec(String),
}
