//! [`Engine`]: amusd inside a program. The models load once, in [`EngineBuilder::build`]; each
//! call then runs one request to its end, streaming text as it is committed if asked. The three
//! strategies give the same tokens; `amusd` runs the two worker processes (found beside the
//! program's executable or in [`EngineBuilder::worker_dir`]) and stops them when the engine drops.
//!
//! ```no_run
//! use amusd::{Engine, GenerateParams, Message, Strategy};
//!
//! let mut engine = Engine::builder().strategy(Strategy::Amusd).build()?;
//! let reply = engine.chat(&[Message::user("What is the capital of France?")], &GenerateParams::default())?;
//! println!("{} ({:.1} ms/token)", reply.text, reply.generation.metrics.ms_per_token());
//! # Ok::<(), amusd::EngineError>(())
//! ```

use std::ffi::OsString;
use std::ops::ControlFlow;
use std::path::PathBuf;

use amusd_model::chat::Message;
use amusd_model::tokenizer::Tokenizer;
use amusd_spec::generate::check_fits;
use amusd_spec::logprobs::Logprobs;
use amusd_spec::{Generation, RequestSampling, StopCriteria};
use clap::Parser;

use crate::args::{ModelArgs, Strategy};
use crate::backend::{Backend, Request};
use crate::generate::{PrepareError, Prepared};
use crate::prompt::{encode_conversation, Texts};

/// What went wrong, by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An option is not one of `amusd generate`'s model options, or its value is wrong.
    #[error("bad engine option: {0}")]
    Options(String),
    /// A model or its tokenizer could not be loaded, or the workers did not start.
    #[error("cannot load the models: {0:#}")]
    Load(anyhow::Error),
    /// The request cannot run as given (nothing changed): it does not fit the context, its
    /// sampling names what the model lacks, or text was given to a model without a tokenizer.
    #[error("bad request: {0:#}")]
    Request(anyhow::Error),
    /// The request failed while running: a model failed, or a worker could not be recovered.
    #[error("generation failed: {0:#}")]
    Generate(anyhow::Error),
}

type Result<T> = std::result::Result<T, EngineError>;

/// How to load an [`Engine`]. Everything has `amusd generate`'s defaults: the default model pair
/// (fetched on first use) and the `amusd` strategy.
#[derive(Clone, Debug)]
pub struct EngineBuilder {
    strategy: Strategy,
    options: Vec<OsString>,
    worker_dir: Option<PathBuf>,
    progress: bool,
}

/// [`ModelArgs`] parsed from the builder's options, so that the engine and the command line
/// share one set of defaults and checks.
#[derive(Parser)]
#[command(no_binary_name = true)]
struct Options {
    #[command(flatten)]
    models: ModelArgs,
}

impl EngineBuilder {
    /// `ar`, `sd` or `amusd` (the default): the same tokens from each, at different speeds.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The verify model: `PATH[:FORMAT]`, as `--verify-model`.
    pub fn verify_model(self, spec: impl Into<OsString>) -> Self {
        self.option("--verify-model", spec)
    }

    /// The draft model (sd, amusd): `PATH[:FORMAT][:head=...]`, `lookup[:MIN-MAX]`..., as
    /// `--draft-model`.
    pub fn draft_model(self, spec: impl Into<OsString>) -> Self {
        self.option("--draft-model", spec)
    }

    /// Any other model option of `amusd generate` (`amusd generate --help`), as on its command
    /// line: `.option("--max-lookahead", "24")`, `.option("--draft-device", "cpu:0")`.
    pub fn option(mut self, flag: &str, value: impl Into<OsString>) -> Self {
        self.options.extend([flag.into(), value.into()]);
        self
    }

    /// A model option without a value: `.flag("--no-draft-lookup")`.
    pub fn flag(mut self, flag: &str) -> Self {
        self.options.push(flag.into());
        self
    }

    /// Where `amusd-draft-worker` and `amusd-verify-worker` are (amusd), when they are neither
    /// beside the program's executable nor in its parent directory.
    pub fn worker_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.worker_dir = Some(dir.into());
        self
    }

    /// A spinner on standard error while the models load, as the command line shows (off by
    /// default: the program owns its terminal; the supervisor's fault lines, a worker found dead
    /// or hung, still go to standard error).
    pub fn progress(mut self, show: bool) -> Self {
        self.progress = show;
        self
    }

    /// Loads the models (and for amusd starts the workers and waits for them). ar and sd run on
    /// the calling thread without binding it to a device; amusd's workers are bound to theirs.
    pub fn build(self) -> Result<Engine> {
        let mut m = Options::try_parse_from(&self.options)
            .map_err(|e| EngineError::Options(clap_message(&e)))?
            .models;
        (m.quiet, m.worker_dir) = (!self.progress, self.worker_dir);
        let strategy = self.strategy;
        let Prepared {
            verify_spec,
            draft_spec,
            texts,
        } = Prepared::read(&m, strategy).map_err(|e| match e {
            PrepareError::Options(e) => EngineError::Options(format!("{e:#}")),
            PrepareError::Load(e) => EngineError::Load(e),
        })?;
        let backend = Backend::open(strategy, &m, &verify_spec, draft_spec.as_deref())
            .map_err(EngineError::Load)?;
        Ok(Engine { backend, texts })
    }
}

/// clap's message without its usage lines.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_string()
}

/// One request's budget and token choice.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    /// The most tokens to generate (a stop token ends the request earlier).
    pub max_new_tokens: usize,
    /// Greedy by default; temperature, top-k/p, penalties, seed, grammar, logprobs... The seed
    /// is what the program sets (0 by default), so a sampled request gives the same tokens each
    /// time until it changes the seed; the command line and the server draw a random one when
    /// none is given.
    pub sampling: RequestSampling,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: RequestSampling::default(),
        }
    }
}

/// A finished request: its text (special tokens left out) and its tokens, finish reason and
/// metrics.
#[derive(Debug)]
pub struct Output {
    pub text: String,
    pub generation: Generation,
}

/// A model pair, loaded, serving one request at a time (see the module doc).
pub struct Engine {
    backend: Backend,
    texts: Texts,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("strategy", &self.strategy())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A builder with `amusd generate`'s defaults: the default model pair, strategy `amusd`.
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            strategy: Strategy::Amusd,
            options: Vec::new(),
            worker_dir: None,
            progress: false,
        }
    }

    /// The strategy the engine was built with.
    pub fn strategy(&self) -> Strategy {
        self.backend.strategy()
    }

    /// The verify model's tokenizer (`None` for the test suite's fake models).
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.texts.verify.as_ref().map(|t| &t.tokenizer)
    }

    /// The reply to a conversation, rendered with the verify model's chat template.
    pub fn chat(&mut self, messages: &[Message], params: &GenerateParams) -> Result<Output> {
        self.chat_stream(messages, params, |_| ControlFlow::Continue(()))
    }

    /// [`Self::chat`], giving `on_text` each piece of text as it is committed; `Break` cancels
    /// the request (it ends with [`amusd_spec::Finish::Cancelled`] and the text so far).
    pub fn chat_stream(
        &mut self,
        messages: &[Message],
        params: &GenerateParams,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Output> {
        let prompt = self.encode(messages, false)?;
        self.run_text(&prompt, params, on_text)
    }

    /// The continuation of `prompt`, given to the model as is (no chat template).
    pub fn complete(&mut self, prompt: &str, params: &GenerateParams) -> Result<Output> {
        self.complete_stream(prompt, params, |_| ControlFlow::Continue(()))
    }

    /// [`Self::complete`], streamed as [`Self::chat_stream`] streams.
    pub fn complete_stream(
        &mut self,
        prompt: &str,
        params: &GenerateParams,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Output> {
        let prompt = self.encode(&[Message::user(prompt.to_string())], true)?;
        self.run_text(&prompt, params, on_text)
    }

    /// The tokens after `prompt` (ids of the verify model's vocabulary), each batch given to
    /// `on_tokens` as it is committed; `Break` cancels.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_tokens: impl FnMut(&[u32]) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let (mut seen, mut stopped) = (0, false);
        let mut generation = run(&mut self.backend, &self.texts, prompt, params, |ids| {
            if stopped {
                return ControlFlow::Break(());
            }
            seen += ids.len();
            let flow = on_tokens(ids);
            stopped = flow.is_break();
            flow
        })?;
        keep_seen(&mut generation, seen);
        Ok(generation)
    }

    fn encode(&self, messages: &[Message], raw: bool) -> Result<Vec<u32>> {
        let verify = self.texts.verify.as_ref().ok_or_else(|| {
            EngineError::Request(anyhow::anyhow!(
                "this verify model has no tokenizer: give token ids to Engine::generate"
            ))
        })?;
        encode_conversation(
            &verify.tokenizer,
            verify.chat_template.as_ref(),
            messages,
            raw,
        )
        .map_err(EngineError::Request)
    }

    /// Generates from `prompt`, detokenizing as tokens are committed.
    fn run_text(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Output> {
        let Self { backend, texts } = self;
        let tokenizer = &texts.verify.as_ref().expect("encoded with it").tokenizer;
        let mut stream = tokenizer.stream(true);
        let (mut seen, mut stopped) = (0, false);
        let mut generation = run(backend, texts, prompt, params, |ids| {
            for &id in ids {
                if stopped {
                    break;
                }
                seen += 1;
                match stream.step(id) {
                    Ok(piece) if !piece.is_empty() => stopped = on_text(&piece).is_break(),
                    _ => {}
                }
            }
            match stopped {
                true => ControlFlow::Break(()),
                false => ControlFlow::Continue(()),
            }
        })?;
        keep_seen(&mut generation, seen);
        if let Ok(rest) = stream.finish() {
            if !rest.is_empty() && !stopped {
                let _ = on_text(&rest);
            }
        }
        let text = tokenizer
            .decode(&generation.tokens, true)
            .map_err(|e| EngineError::Generate(e.into()))?;
        Ok(Output { text, generation })
    }
}

/// Cuts a cancelled generation to the `seen` tokens its callback was given: tokens committed in
/// the same batch as the `Break`, or before the pair stopped, reached no one, and the result
/// must say what was streamed (it ran a few tokens past it under sd and amusd).
fn keep_seen(g: &mut Generation, seen: usize) {
    if g.tokens.len() > seen {
        g.tokens.truncate(seen);
        g.logprobs.truncate(seen);
    }
}

/// One request on `backend`, checked against the models' `texts` first.
fn run(
    backend: &mut Backend,
    texts: &Texts,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_tokens: impl FnMut(&[u32]) -> ControlFlow<()>,
) -> Result<Generation> {
    let bad = |e: anyhow::Error| EngineError::Request(e);
    if params.max_new_tokens == 0 {
        return Err(bad(anyhow::anyhow!(
            "max_new_tokens is 0: nothing to generate"
        )));
    }
    texts.check_prompt_ids(prompt).map_err(bad)?;
    texts.check_sampling(&params.sampling).map_err(bad)?;
    let limit = backend.strategy().token_limit();
    check_fits(texts.context(limit), prompt.len(), params.max_new_tokens)
        .map_err(|e| bad(e.into()))?;
    let stop = StopCriteria {
        stop_ids: texts.stop_ids(),
        max_new_tokens: params.max_new_tokens,
    };
    let request = Request {
        prompt,
        stop: &stop,
        sampling: &params.sampling,
        cancelled: None,
    };
    let mut on_tokens = |ids: &[u32], _: &[Logprobs]| on_tokens(ids);
    let completion = backend
        .generate(&request, &mut on_tokens)
        .map_err(EngineError::Generate)?;
    Ok(completion.generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program may move its engine to the thread that serves it.
    #[test]
    fn an_engine_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Engine>();
    }

    #[test]
    fn options_parse_as_generate_parses_them() {
        let parse = |args: &[&str]| Options::try_parse_from(args).map(|o| o.models);
        let m = parse(&["--max-lookahead", "24", "--no-draft-lookup"]).unwrap();
        assert_eq!((m.max_lookahead, m.no_draft_lookup), (24, true));
        let e = parse(&["--max-lookahead", "many"]).err().unwrap();
        assert!(clap_message(&e).contains("many"), "{}", clap_message(&e));
        assert!(!clap_message(&e).contains("Usage"));
    }
}
