//! ar and sd, in this process: the verify model (and the draft, for sd) loaded once.

use amusd_model::loader::{self, LoadedModel, ModelSpec};
use amusd_model::DeviceSpec;
use amusd_shm::now_us;
use amusd_spec::generate::{autoregressive, speculative, OnTokens};
use amusd_spec::{Drafter, LlamaDecoder, Verifier};
use anyhow::{Context, Result};

use super::trace::{Timed, Trace};
use super::{Completion, Request};
use crate::output::Spinner;

/// Binds this process to the verify model's device for ar and sd. Call before any model loads or
/// any prompt is tokenized: the compute pools read their thread count once, when they start.
pub fn bind_in_process(verify_device: DeviceSpec) -> Result<()> {
    Ok(amusd_proc::bind::bind_current_process(verify_device)?)
}

/// The in-process models. The verify model serves both ar and sd.
pub struct InProcess {
    verifier: Verifier<Timed<LlamaDecoder>>,
    drafter: Option<Drafter<Timed<LlamaDecoder>>>,
    /// sd: draft tokens per verify step.
    lookahead: usize,
}

impl InProcess {
    /// Loads the verify model, and the draft if `draft_spec` is given (sd needs one).
    pub fn load(verify_spec: &str, draft_spec: Option<&str>, lookahead: usize) -> Result<Self> {
        let verify = load_model(verify_spec, "verify")?;
        let drafter = match draft_spec {
            Some(spec) => Some(Drafter::new(Timed::new(LlamaDecoder::new(
                load_model(spec, "draft")?.llama,
            )))),
            None => None,
        };
        Ok(Self {
            verifier: Verifier::new(Timed::new(LlamaDecoder::new(verify.llama))),
            drafter,
            lookahead,
        })
    }

    /// The most positions a request may reach.
    pub fn max_position(&self) -> usize {
        self.verifier.decoder.inner().model.config.max_position
    }

    pub(super) fn generate(
        &mut self,
        speculate: bool,
        request: &Request<'_>,
        on_tokens: &mut OnTokens<'_>,
    ) -> Result<Completion> {
        let Request {
            prompt,
            stop,
            sampling,
        } = *request;
        // Spans left by a request that failed half-way are not this one's.
        self.verifier.decoder.take_spans(0);
        if let Some(d) = self.drafter.as_mut() {
            d.decoder.take_spans(0);
        }
        let mut commits = Vec::new();
        let start = now_us();
        let mut on_tokens = |ids: &[u32]| {
            commits.push((now_us().saturating_sub(start), ids.len()));
            on_tokens(ids)
        };
        let generation = match (speculate, self.drafter.as_mut()) {
            (false, _) => {
                autoregressive(&mut self.verifier, prompt, stop, sampling, &mut on_tokens)?
            }
            (true, Some(drafter)) => speculative(
                &mut self.verifier,
                drafter,
                prompt,
                stop,
                sampling,
                self.lookahead,
                &mut on_tokens,
            )?,
            (true, None) => anyhow::bail!("internal: sd without a draft model"),
        };
        let draft = match self.drafter.as_mut() {
            Some(d) => d.decoder.take_spans(start),
            None => Vec::new(),
        };
        let trace = Trace {
            commits,
            verify: self.verifier.decoder.take_spans(start),
            draft,
            ..Default::default()
        };
        Ok(Completion { generation, trace })
    }
}

/// Loads a model from a spec, with a spinner.
fn load_model(spec: &str, role: &str) -> Result<LoadedModel> {
    let spec: ModelSpec = spec.parse()?;
    let _spinner = Spinner::new(format!("loading {role} model {}", spec.path.display()));
    loader::load(&spec).with_context(|| format!("cannot load the {role} model"))
}
