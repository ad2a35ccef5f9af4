//! `amusd serve`: the OpenAI-compatible server of `amusd-server` on today's decoding code. This file
//! only adapts: the model's tokenizer and chat template as the server's `Codec`, and the worker
//! pair (`amusd`) or the in-process loops (`ar`, `sd`) as its `Generator`.

use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use amusd_model::chat::{Message, RenderOptions};
use amusd_model::loader::ModelText;
use amusd_model::tokenizer::TokenStream;
use amusd_server::{
    ApiKeys, ChatMessage, ChatOptions, Codec, GenError, GenRequest, GenStats, Generator,
    GeneratorFactory, Limits, Sampling, Server, TextStream, TokenLogprobs,
};
use amusd_spec::constraint::{Grammar, GrammarKind};
use amusd_spec::fake::FakeModel;
use amusd_spec::logprobs::Logprobs;
use amusd_spec::{
    Dry, Finish, LogitBias, Penalties, RequestSampling, SamplingParams, StopCriteria,
};
use anyhow::{bail, Context, Result};
use clap::Args;

use crate::args::{ModelArgs, Strategy};
use crate::backend::{bind_in_process, Backend, Request};
use crate::prompt::{render_chat, Texts};
use crate::supervisor::{install_signal_handlers, INTERRUPTED};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    #[arg(long, value_enum, default_value = "amusd")]
    pub strategy: Strategy,
    /// Requests that may wait while one runs; beyond, 429 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Seconds a request may take from arrival to its last token (0: no limit).
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Largest request body, in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Responses API responses kept in memory for `previous_response_id` and `GET
    /// /v1/responses/{id}`, the oldest dropped first (0: none kept).
    #[arg(long, default_value_t = 256)]
    pub max_stored_responses: usize,
    /// Clients must present one of these keys (`Authorization: Bearer KEY` or `X-Api-Key: KEY`);
    /// comma-separated or repeated. `/health` and `/metrics` stay open.
    #[arg(
        long,
        env = "AMUSD_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_key: Vec<String>,
    /// The model's name in /v1/models and in responses (llama.cpp's --alias, vLLM's
    /// --served-model-name; default: the model file's name).
    #[arg(long, visible_alias = "served-model-name", value_name = "NAME")]
    pub alias: Option<String>,
    /// A file of API keys, one per line (blank lines and `#` comments skipped), with --api-key's.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// sd/amusd: the draft proposes its greedy tokens instead of sampling with the same noise.
    #[arg(long)]
    pub greedy_draft: bool,
    #[command(flatten)]
    pub models: ModelArgs,
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    install_signal_handlers();
    log_to_stderr();
    let api_keys = api_keys(&args)?;
    let m = &args.models;
    let verify_spec = m.verify_spec()?;
    let draft_spec = m.draft_spec(args.strategy)?;
    let fake = FakeModel::is_fake(&verify_spec);
    if fake && args.strategy != Strategy::Amusd {
        bail!("fake models are served with --strategy amusd only");
    }
    if args.strategy != Strategy::Amusd {
        bind_in_process(m.verify_device()?)?;
    } else {
        // Checked now, so a bad device is an error before the port opens.
        m.verify_device()?;
        m.draft_device()?;
    }
    let codec = Arc::new(codec(&args, &verify_spec, &draft_spec)?);
    let model_id = codec.model_id.clone();
    let factory = factory(&args, codec.stop_ids.clone(), verify_spec, draft_spec);
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        request_timeout: (args.request_timeout > 0)
            .then(|| Duration::from_secs(args.request_timeout)),
        retry_after_s: 1,
        api_keys,
        stored_responses: args.max_stored_responses,
    };
    let listener = std::net::TcpListener::bind((args.host.as_str(), args.port))
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let keys = match limits.api_keys.len() {
        0 => String::new(),
        n => format!("; {n} API key(s) required but on /health and /metrics"),
    };
    let server = Server::start(codec, factory, args.queue, limits)?;
    eprintln!(
        "amusd: serving {model_id} on http://{} (strategy {}; /health says 200 once the models are loaded{keys})",
        listener.local_addr()?,
        args.strategy.name()
    );
    // SIGTERM and Ctrl-C set INTERRUPTED (the workers' supervisor reads it too).
    let shutdown = async {
        while !INTERRUPTED.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    server.serve(listener, shutdown)?;
    eprintln!(
        "amusd: shut down{}",
        if args.strategy == Strategy::Amusd {
            "; workers stopped, region removed"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The server's log (a line per finished request, failures, idle-step errors) on standard
/// error, at `RUST_LOG`'s levels (default: info).
fn log_to_stderr() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// The keys of `--api-key` and `--api-key-file`.
fn api_keys(args: &ServeArgs) -> Result<ApiKeys> {
    let mut keys = args.api_key.clone();
    if let Some(path) = &args.api_key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --api-key-file {}", path.display()))?;
        keys.extend(
            (text.lines().map(str::trim))
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        );
        if keys.is_empty() {
            bail!("--api-key-file {} holds no key", path.display());
        }
    }
    ApiKeys::new(keys).context("--api-key")
}

/// The tokenizer side, loaded before the port opens so bad model paths fail at once.
fn codec(args: &ServeArgs, verify_spec: &str, draft_spec: &str) -> Result<TextCodec> {
    let name = |spec: &str| {
        let path = spec.rsplit_once(':').map_or(spec, |(p, _)| p);
        std::path::Path::new(path)
            .file_name()
            .map_or(spec.to_string(), |n| n.to_string_lossy().into_owned())
    };
    let draft = (args.strategy != Strategy::Ar).then_some(draft_spec);
    let texts = Texts::load(verify_spec, draft)?
        .with_chat_template(args.models.chat_template_file.as_deref())?;
    let context = texts.context(amusd_shm::TOKEN_CAPACITY);
    let stop_ids = texts.stop_ids();
    let grammars = texts.grammars.clone();
    let Some(verify) = texts.verify else {
        let fake = FakeModel::parse(verify_spec)?;
        return Ok(TextCodec {
            model_id: args.alias.clone().unwrap_or_else(|| "fake".into()),
            context: fake.capacity.min(context),
            stop_ids,
            text: None,
            vocab: fake.vocab as usize,
            grammars,
            dry_cache: Default::default(),
        });
    };
    Ok(TextCodec {
        model_id: args.alias.clone().unwrap_or_else(|| name(verify_spec)),
        context,
        stop_ids,
        vocab: verify.tokenizer.vocab_size(),
        text: Some(verify),
        grammars,
        dry_cache: Default::default(),
    })
}

/// The verify model's tokenizer and chat template; a fake model's ids are the prompt's bytes, and
/// its text is the ids in decimal.
struct TextCodec {
    model_id: String,
    context: usize,
    stop_ids: Vec<u32>,
    vocab: usize,
    text: Option<ModelText>,
    grammars: Option<Arc<dyn amusd_spec::constraint::Constraints>>,
    /// The last request's DRY breakers and their set: finding them reads every token's text, and
    /// requests mostly give llama.cpp's defaults.
    dry_cache: std::sync::Mutex<Option<(Vec<String>, Vec<u64>)>>,
}

impl Codec for TextCodec {
    fn model_id(&self) -> &str {
        &self.model_id
    }

    fn context_length(&self) -> usize {
        self.context
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn encode_chat(
        &self,
        messages: &[ChatMessage],
        options: &ChatOptions,
    ) -> Result<Vec<u32>, String> {
        let text = self.render_chat(messages, options)?;
        match &self.text {
            Some(t) => t.tokenizer.encode(&text, false).map_err(|e| e.to_string()),
            None => self.encode_prompt(&text),
        }
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        options: &ChatOptions,
    ) -> Result<String, String> {
        let Some(t) = &self.text else {
            let joined: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            return Ok(joined.join("\n"));
        };
        let messages: Vec<Message> = messages
            .iter()
            .map(|m| Message {
                role: m.role.clone(),
                content: m.content.clone(),
                tool_calls: m.tool_calls.clone(),
                tool_call_id: m.tool_call_id.clone(),
            })
            .collect();
        let options = RenderOptions {
            add_generation_prompt: options.add_generation_prompt,
            continue_final_message: options.continue_final_message,
            kwargs: options.template_kwargs.clone(),
        };
        render_chat(t.chat_template.as_ref(), &messages, &options).map_err(|e| format!("{e:#}"))
    }

    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, String> {
        match &self.text {
            Some(t) => (t.tokenizer.encode(text, add_special)).map_err(|e| e.to_string()),
            None => self.encode_prompt(text),
        }
    }

    fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>, String> {
        match &self.text {
            Some(t) => t.tokenizer.encode(prompt, true).map_err(|e| e.to_string()),
            None => Ok(prompt
                .bytes()
                .map(|b| u32::from(b) % self.vocab as u32)
                .collect()),
        }
    }

    fn text_stream(&self) -> Box<dyn TextStream + '_> {
        match &self.text {
            Some(t) => Box::new(Detokenizer(t.tokenizer.stream(true))),
            None => Box::new(Decimal),
        }
    }

    fn token_text(&self, id: u32) -> String {
        match &self.text {
            Some(t) => t.tokenizer.decode(&[id], false).unwrap_or_default(),
            None => Decimal.push(id),
        }
    }

    fn chat_template(&self) -> Option<String> {
        let t = self.text.as_ref()?.chat_template.as_ref()?;
        Some(t.source().to_string())
    }

    fn dry_breakers(&self, breakers: Option<&[String]>) -> Vec<u64> {
        let Some(t) = &self.text else {
            return Vec::new();
        };
        let default = amusd_spec::dry::DEFAULT_BREAKERS.map(String::from);
        let breakers = breakers.unwrap_or(&default);
        let mut last = self.dry_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, bits)) = last.as_ref().filter(|(s, _)| s == breakers) {
            return bits.clone();
        }
        let bits = Dry::breaker_bits(t.tokenizer.tokens_containing(breakers));
        *last = Some((breakers.to_vec(), bits.clone()));
        bits
    }

    fn check_grammar(&self, grammar: &amusd_server::format::OutputGrammar) -> Result<(), String> {
        crate::prompt::check_grammar(self.grammars.as_deref(), &grammar_of(grammar))
            .map_err(|e| format!("{e:#}"))
    }
}

struct Detokenizer<'a>(TokenStream<'a>);

impl TextStream for Detokenizer<'_> {
    fn push(&mut self, id: u32) -> String {
        self.0.step(id).unwrap_or_default()
    }

    fn finish(&mut self) -> String {
        self.0.finish().unwrap_or_default()
    }
}

/// A fake model's text: each id in decimal, then a space.
struct Decimal;

impl TextStream for Decimal {
    fn push(&mut self, id: u32) -> String {
        format!("{id} ")
    }

    fn finish(&mut self) -> String {
        String::new()
    }
}

/// Builds the generator on the decode thread: the worker pair, or the in-process models.
fn factory(
    args: &ServeArgs,
    stop_ids: Vec<u32>,
    verify_spec: String,
    draft_spec: String,
) -> GeneratorFactory {
    let models = args.models.clone();
    let (strategy, greedy_draft) = (args.strategy, args.greedy_draft);
    Box::new(move || {
        let draft = (strategy != Strategy::Ar).then_some(draft_spec.as_str());
        let backend = Backend::open(strategy, &models, &verify_spec, draft)
            .map_err(|e| GenError::Failed(format!("{e:#}")))?;
        Ok(Box::new(ServeGenerator {
            backend,
            stop_ids,
            greedy_draft,
        }) as Box<dyn Generator>)
    })
}

struct ServeGenerator {
    backend: Backend,
    stop_ids: Vec<u32>,
    greedy_draft: bool,
}

impl Generator for ServeGenerator {
    fn generate(
        &mut self,
        req: &GenRequest,
        on_tokens: &mut dyn FnMut(&[u32], &[TokenLogprobs]),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<GenStats, GenError> {
        let stop = StopCriteria {
            stop_ids: self.stop_ids.clone(),
            max_new_tokens: req.max_tokens,
        };
        let sampling = request_sampling(&req.sampling, self.greedy_draft)?;
        let request = Request {
            prompt: &req.prompt,
            stop: &stop,
            sampling: &sampling,
            cancelled: Some(cancelled),
        };
        // A request is cancelled between commits, or (under amusd) while its prompt is prefilled:
        // the client's tokens keep arriving every few milliseconds, so a hang-up ends the work at
        // the next batch.
        let mut on_tokens = |ids: &[u32], logprobs: &[Logprobs]| {
            on_tokens(ids, &token_logprobs(logprobs));
            if cancelled() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let g = self
            .backend
            .generate(&request, &mut on_tokens)
            .map_err(|e| GenError::Failed(format!("{e:#}")))?
            .generation;
        Ok(GenStats {
            stopped_by_model: g.finish == Finish::Stop,
            draft_n: g.metrics.proposed as u64,
            draft_n_accepted: g.metrics.accepted as u64,
            rollbacks: g.metrics.rollbacks as u64,
            cache_n: g.metrics.cached_prompt_tokens,
            prompt_logprobs: token_logprobs(&g.prompt_logprobs),
        })
    }

    fn idle(&mut self) -> Result<(), GenError> {
        match &mut self.backend {
            Backend::Amusd(w) => w
                .check_idle()
                .map_err(|e| GenError::Failed(format!("{e:#}"))),
            _ => Ok(()),
        }
    }

    fn worker_restarts(&self) -> u64 {
        match &self.backend {
            Backend::Amusd(w) => u64::from(w.fault_stats().restarts),
            _ => 0,
        }
    }

    fn unavailable(&self) -> Option<String> {
        match &self.backend {
            Backend::Amusd(w) => w.down().map(str::to_string),
            _ => None,
        }
    }
}

/// Log-probabilities as the server takes them.
fn token_logprobs(logprobs: &[Logprobs]) -> Vec<TokenLogprobs> {
    (logprobs.iter())
        .map(|l| TokenLogprobs {
            token: l.chosen.token,
            logprob: l.chosen.logprob,
            top: l.top.iter().map(|t| (t.token, t.logprob)).collect(),
        })
        .collect()
}

/// The server's sampling as the decoders take it; a sampled request without a seed gets a random one.
fn request_sampling(s: &Sampling, greedy_draft: bool) -> Result<RequestSampling, GenError> {
    let mut params = SamplingParams {
        temperature: s.temperature,
        dynatemp_range: s.dynatemp_range,
        dynatemp_exponent: s.dynatemp_exponent,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        top_n_sigma: s.top_n_sigma,
        typical_p: s.typical_p,
        xtc_probability: s.xtc_probability,
        xtc_threshold: s.xtc_threshold,
        seed: 0,
        penalties: Penalties {
            repeat: s.repeat_penalty,
            frequency: s.frequency_penalty,
            presence: s.presence_penalty,
            last_n: s.repeat_last_n,
        },
        logit_bias: LogitBias::new(s.logit_bias.iter().copied())
            .map_err(|e| GenError::BadRequest(format!("bad logit_bias: {e}")))?,
        dry: Dry {
            multiplier: s.dry.multiplier,
            base: s.dry.base,
            allowed_length: s.dry.allowed_length,
            last_n: s.dry.last_n,
            breakers: s.dry.breakers.clone(),
        },
    }
    .validate()
    .map_err(|e| GenError::BadRequest(format!("bad sampling parameter: {e}")))?;
    if !params.is_greedy() {
        params.seed = s.seed.unwrap_or_else(rand::random);
    }
    Ok(RequestSampling {
        params,
        greedy_draft,
        no_draft_lookup: !s.prompt_lookup,
        cache_prompt: s.cache_prompt,
        logprobs: s.logprobs,
        prompt_logprobs: s.prompt_logprobs,
        grammar: s.grammar.as_ref().map(grammar_of),
    })
}

/// A server request's grammar as the decoders take it.
fn grammar_of(g: &amusd_server::format::OutputGrammar) -> Grammar {
    use amusd_server::format::GrammarType;
    let kind = match g.kind {
        GrammarType::JsonObject => GrammarKind::JsonObject,
        GrammarType::JsonSchema => GrammarKind::JsonSchema,
        GrammarType::Regex => GrammarKind::Regex,
        GrammarType::Lark => GrammarKind::Lark,
        GrammarType::Gbnf => GrammarKind::Gbnf,
    };
    Grammar::new(kind, g.text.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_can_leave_prompt_lookup_out() {
        let on = request_sampling(&Sampling::default(), false).unwrap();
        assert!(!on.no_draft_lookup && on.params.is_greedy() && !on.greedy_draft);
        let off = Sampling {
            prompt_lookup: false,
            ..Sampling::default()
        };
        let off = request_sampling(&off, true).unwrap();
        assert!(off.no_draft_lookup && off.greedy_draft);
    }
}
