//! ar and sd, in this process: the verify model (and the draft, for sd) loaded once.

use amusd_model::loader::{self, LoadedModel, ModelSpec};
use amusd_model::DeviceSpec;
use amusd_shm::now_us;
use amusd_spec::generate::{autoregressive, speculative, OnTokens};
use amusd_spec::history::NgramHistory;
use amusd_spec::logprobs::Logprobs;
use amusd_spec::lookup::NoModel;
use amusd_spec::{Decoder, Drafter, LlamaDecoder, Verifier};
use anyhow::{Context, Result};

use super::trace::{Timed, Trace};
use super::{Completion, Request};
use crate::args::ModelArgs;
use crate::output::Spinner;

/// Binds this process to the verify model's device for ar and sd. Call before any model loads or
/// any prompt is tokenized: the compute pools read their thread count once, when they start.
pub fn bind_in_process(verify_device: DeviceSpec) -> Result<()> {
    Ok(amusd_proc::bind::bind_current_process(verify_device)?)
}

/// The in-process models. The verify model serves both ar and sd.
pub struct InProcess {
    verifier: Verifier<Timed<LlamaDecoder>>,
    drafter: Option<Drafter<Timed<Box<dyn Decoder + Send>>>>,
    /// sd: draft tokens per verify step.
    lookahead: usize,
}

impl InProcess {
    /// Loads the verify model, and the draft if `draft_spec` is given (sd needs one): a model,
    /// or prompt lookup (`lookup[:MIN-MAX]`, no model), with the lookup ahead of the model if `m`
    /// asks for it.
    pub fn load(verify_spec: &str, draft_spec: Option<&str>, m: &ModelArgs) -> Result<Self> {
        let verify = load_model(verify_spec, "verify", m.quiet)?;
        // Both models share one vocabulary (checked with the prompt), so one compiler serves both.
        let constraints = amusd_proc::constraints_for(verify_spec);
        let drafter = match draft_spec {
            Some(spec) => Some(load_drafter(spec, m)?.with_constraints(constraints.clone())),
            None => None,
        };
        let verifier = Verifier::new(Timed::new(LlamaDecoder::new(verify.llama)));
        Ok(Self {
            verifier: verifier.with_constraints(constraints),
            drafter,
            lookahead: m.lookahead,
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
            ..
        } = *request;
        // Spans left by a request that failed half-way are not this one's.
        self.verifier.decoder.take_spans(0);
        if let Some(d) = self.drafter.as_mut() {
            d.decoder.take_spans(0);
        }
        let mut commits = Vec::new();
        let start = now_us();
        let mut on_tokens = |ids: &[u32], logprobs: &[Logprobs]| {
            commits.push((now_us().saturating_sub(start), ids.len()));
            on_tokens(ids, logprobs)
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

/// The sd drafter of `spec`: prompt lookup alone, or the draft model, with the lookup (and the
/// n-gram history) ahead of it if `m` asks for it.
fn load_drafter(spec: &str, m: &ModelArgs) -> Result<Drafter<Timed<Box<dyn Decoder + Send>>>> {
    let max_run = m.lookup_max_run.max(1);
    if let Some(range) = m.lookup_alone()? {
        let no_model: Box<dyn Decoder + Send> = Box::new(NoModel);
        return Ok(Drafter::new(Timed::new(no_model)).with_lookup(range, true, max_run));
    }
    let model: Box<dyn Decoder + Send> =
        Box::new(LlamaDecoder::new(load_model(spec, "draft", m.quiet)?.llama));
    let drafter = Drafter::new(Timed::new(model));
    Ok(match m.lookup_ahead() {
        Some(range) if m.draft_history() => drafter
            .with_lookup(range, false, max_run)
            .with_history(NgramHistory::default()),
        Some(range) => drafter.with_lookup(range, false, max_run),
        None => drafter,
    })
}

/// Loads a model from a spec, with a spinner unless `quiet`.
fn load_model(spec: &str, role: &str, quiet: bool) -> Result<LoadedModel> {
    let spec: ModelSpec = spec.parse()?;
    let _spinner =
        (!quiet).then(|| Spinner::new(format!("loading {role} model {}", spec.path.display())));
    loader::load(&spec).with_context(|| format!("cannot load the {role} model"))
}
