//! One road from a request to its tokens, whatever the strategy. `generate` and `bench` (and a
//! long-running server) load a [`Backend`] once and call [`Backend::generate`] for each request;
//! the token callback streams what is committed and may cancel the request.

mod chaos;
mod in_process;
mod trace;
mod workers;

use amusd_spec::generate::OnTokens;
use amusd_spec::{Generation, RequestSampling, StopCriteria};
use anyhow::{Context, Result};

pub use in_process::{bind_in_process, InProcess};
pub use trace::{Span, Trace};
pub use workers::Workers;

use crate::args::{ModelArgs, Strategy};

/// One request: its prompt tokens, when to stop, how to choose tokens.
pub struct Request<'a> {
    pub prompt: &'a [u32],
    pub stop: &'a StopCriteria,
    pub sampling: &'a RequestSampling,
    /// Polled while the workers produce nothing to commit (a long prompt's prefill): true cancels
    /// the request as a `Break` from the token callback does between commits. The in-process
    /// backends run a prefill as one call and see only the callback.
    pub cancelled: Option<&'a dyn Fn() -> bool>,
}

/// A finished request and when each of its forward passes ran.
pub struct Completion {
    pub generation: Generation,
    pub trace: Trace,
}

/// The models of one strategy, loaded and ready for requests.
pub enum Backend {
    /// Autoregressive decoding with the verify model, in this process.
    Ar(InProcess),
    /// Synchronous speculative decoding, in this process.
    Sd(InProcess),
    /// The two worker processes.
    Amusd(Workers),
}

impl Backend {
    /// Loads the models of `strategy`: the verify model (and the draft, for sd) in this process,
    /// or the two workers for amusd (`draft_spec` is needed by sd and amusd).
    pub fn open(
        strategy: Strategy,
        m: &ModelArgs,
        verify_spec: &str,
        draft_spec: Option<&str>,
    ) -> Result<Self> {
        let draft = || draft_spec.context("sd and amusd need a draft model");
        Ok(match strategy {
            Strategy::Ar => Self::Ar(InProcess::load(verify_spec, None, m)?),
            Strategy::Sd => Self::Sd(InProcess::load(verify_spec, Some(draft()?), m)?),
            Strategy::Amusd => Self::Amusd(Workers::start(m, verify_spec, draft()?)?),
        })
    }

    pub fn strategy(&self) -> Strategy {
        match self {
            Self::Ar(_) => Strategy::Ar,
            Self::Sd(_) => Strategy::Sd,
            Self::Amusd(_) => Strategy::Amusd,
        }
    }

    /// Runs one request to its end (or until `on_tokens` breaks).
    pub fn generate(
        &mut self,
        request: &Request<'_>,
        on_tokens: &mut OnTokens<'_>,
    ) -> Result<Completion> {
        match self {
            Self::Ar(p) => p.generate(false, request, on_tokens),
            Self::Sd(p) => p.generate(true, request, on_tokens),
            Self::Amusd(w) => w.generate(request, on_tokens),
        }
    }
}
