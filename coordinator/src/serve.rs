//! `amusd serve`: the OpenAI-compatible server of `amusd-server` on today's decoding code. This file
//! only adapts: the model's tokenizer and chat template as the server's `Codec`, and the worker
//! pair (`amusd`) or the in-process loops (`ar`, `sd`) as its `Generator`.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use amusd_model::chat::Message;
use amusd_model::loader::ModelText;
use amusd_model::tokenizer::TokenStream;
use amusd_server::{
    ChatMessage, Codec, GenError, GenRequest, GenStats, Generator, GeneratorFactory, Limits,
    Sampling, Server, TextStream,
};
use amusd_spec::fake::FakeModel;
use amusd_spec::generate::{autoregressive, speculative};
use amusd_spec::{
    Drafter, FinishReason, Generation, LlamaDecoder, RequestSampling, SamplingParams, StopCriteria,
    Verifier,
};
use anyhow::{bail, Context, Result};
use clap::Args;

use crate::amusd::{fake_stop, text_of, Engine};
use crate::generate::{
    check_same_vocabulary, encode_conversation, load_model, ModelArgs, Strategy,
};
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
    /// sd/amusd: the draft proposes its greedy tokens instead of sampling with the same noise.
    #[arg(long)]
    pub greedy_draft: bool,
    #[command(flatten)]
    pub models: ModelArgs,
}

pub fn run(args: ServeArgs) -> Result<ExitCode> {
    install_signal_handlers();
    let m = &args.models;
    let verify_spec = m.verify_spec()?;
    let draft_spec = m.draft_spec()?;
    let fake = FakeModel::is_fake(&verify_spec);
    if fake && args.strategy != Strategy::Amusd {
        bail!("fake models are served with --strategy amusd only");
    }
    if args.strategy != Strategy::Amusd {
        amusd_spec::bind::bind_current_process(m.verify_device()?)?;
    } else {
        // Checked now, so a bad device is an error before the port opens.
        m.verify_device()?;
        m.draft_device()?;
    }
    let codec = Arc::new(codec(&verify_spec, &draft_spec, args.strategy)?);
    let model_id = codec.model_id.clone();
    let factory = factory(&args, codec.stop_ids.clone(), verify_spec, draft_spec);
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        request_timeout: (args.request_timeout > 0)
            .then(|| Duration::from_secs(args.request_timeout)),
        retry_after_s: 1,
    };
    let listener = std::net::TcpListener::bind((args.host.as_str(), args.port))
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let server = Server::start(codec, factory, args.queue, limits)?;
    eprintln!(
        "amusd: serving {model_id} on http://{} (strategy {}; /health says 200 once the models are loaded)",
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

/// The tokenizer side, loaded before the port opens so bad model paths fail at once.
fn codec(verify_spec: &str, draft_spec: &str, strategy: Strategy) -> Result<TextCodec> {
    let name = |spec: &str| {
        let path = spec.rsplit_once(':').map_or(spec, |(p, _)| p);
        std::path::Path::new(path)
            .file_name()
            .map_or(spec.to_string(), |n| n.to_string_lossy().into_owned())
    };
    let Some(verify) = text_of(verify_spec, "verify")? else {
        let fake = FakeModel::parse(verify_spec)?;
        return Ok(TextCodec {
            model_id: "fake".into(),
            context: fake.capacity.min(amusd_shm::TOKEN_CAPACITY),
            stop_ids: fake_stop(verify_spec),
            text: None,
            vocab: fake.vocab as usize,
        });
    };
    let mut context = verify.context_length.min(amusd_shm::TOKEN_CAPACITY);
    if strategy != Strategy::Ar {
        if let Some(draft) = text_of(draft_spec, "draft")? {
            check_same_vocabulary(&verify.tokenizer, &draft.tokenizer)?;
            context = context.min(draft.context_length);
        }
    }
    Ok(TextCodec {
        model_id: name(verify_spec),
        context,
        stop_ids: verify.eos_ids.clone(),
        vocab: verify.tokenizer.vocab_size(),
        text: Some(verify),
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

    fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, String> {
        let Some(t) = &self.text else {
            let joined: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
            return self.encode_prompt(&joined.join("\n"));
        };
        let messages: Vec<Message> = messages
            .iter()
            .map(|m| Message {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        encode_conversation(&t.tokenizer, t.chat_template.as_ref(), &messages, false)
            .map_err(|e| format!("{e:#}"))
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
        let load = || -> Result<Box<dyn Generator>> {
            let backend = match strategy {
                Strategy::Amusd => {
                    Backend::Pair(Box::new(Engine::start(&models, &verify_spec, &draft_spec)?))
                }
                Strategy::Ar | Strategy::Sd => {
                    let verify = load_model(&verify_spec, "verify")?;
                    let verifier = Verifier::new(LlamaDecoder::new(verify.llama));
                    let drafter = match strategy {
                        Strategy::Sd => Some(Drafter::new(LlamaDecoder::new(
                            load_model(&draft_spec, "draft")?.llama,
                        ))),
                        _ => None,
                    };
                    Backend::Local(Box::new(Local {
                        verifier,
                        drafter,
                        lookahead: models.lookahead,
                    }))
                }
            };
            Ok(Box::new(ServeGenerator {
                backend,
                stop_ids,
                greedy_draft,
            }))
        };
        load().map_err(|e| GenError::Failed(format!("{e:#}")))
    })
}

enum Backend {
    Pair(Box<Engine>),
    Local(Box<Local>),
}

/// `ar` (no drafter) or `sd`, in this process. Not cancellable midway: a cancelled request runs to
/// its end, its tokens dropped.
struct Local {
    verifier: Verifier<LlamaDecoder>,
    drafter: Option<Drafter<LlamaDecoder>>,
    lookahead: usize,
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
        on_tokens: &mut dyn FnMut(&[u32]),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<GenStats, GenError> {
        let stop = StopCriteria {
            stop_ids: self.stop_ids.clone(),
            max_new_tokens: req.max_tokens,
        };
        let sampling = request_sampling(&req.sampling, self.greedy_draft)?;
        let failed = |e: String| GenError::Failed(e);
        let g: Generation = match &mut self.backend {
            Backend::Pair(engine) => engine
                .generate_until(&req.prompt, &stop, &sampling, on_tokens, cancelled)
                .map_err(|e| failed(format!("{e:#}")))?,
            Backend::Local(local) => {
                let Local {
                    verifier,
                    drafter,
                    lookahead,
                } = local.as_mut();
                let g = match drafter {
                    None => autoregressive(verifier, &req.prompt, &stop, &sampling, on_tokens),
                    Some(d) => speculative(
                        verifier,
                        d,
                        &req.prompt,
                        &stop,
                        &sampling,
                        *lookahead,
                        on_tokens,
                    ),
                };
                g.map_err(|e| failed(e.to_string()))?
            }
        };
        Ok(GenStats {
            stopped_by_model: g.finish == FinishReason::Stop,
            draft_n: g.metrics.proposed as u64,
            draft_n_accepted: g.metrics.accepted as u64,
            rollbacks: g.metrics.rollbacks as u64,
        })
    }

    fn idle(&mut self) -> Result<(), GenError> {
        match &mut self.backend {
            Backend::Pair(engine) => engine
                .sup
                .check(false)
                .map_err(|e| GenError::Failed(format!("{e:#}"))),
            Backend::Local(_) => Ok(()),
        }
    }

    fn worker_restarts(&self) -> u64 {
        match &self.backend {
            Backend::Pair(engine) => u64::from(engine.sup.restarts),
            Backend::Local(_) => 0,
        }
    }
}

/// The server's sampling as the decoders take it; a sampled request without a seed gets a random one.
fn request_sampling(s: &Sampling, greedy_draft: bool) -> Result<RequestSampling, GenError> {
    let mut params = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        seed: 0,
    }
    .validate()
    .map_err(|e| GenError::BadRequest(format!("bad sampling parameter: {e}")))?;
    if !params.is_greedy() {
        params.seed = s.seed.unwrap_or_else(rand::random);
    }
    Ok(RequestSampling {
        params,
        greedy_draft,
    })
}
