//! `amusd generate`: one prompt, one strategy.

use std::path::PathBuf;
use std::process::ExitCode;

use amusd_model::chat::Message;
use amusd_model::loader::{self, LoadedModel, ModelSpec};
use amusd_model::tokenizer::Tokenizer;
use amusd_model::DeviceSpec;
use amusd_spec::generate::{autoregressive, speculative};
use amusd_spec::lookup::{NgramRange, NoModel};
use amusd_spec::{
    Decoder, Drafter, Generation, LlamaDecoder, RequestSampling, SamplingParams, StopCriteria,
    Verifier,
};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use crate::output::{print_text, Spinner};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    /// Autoregressive greedy decoding with the verify model alone.
    Ar,
    /// Synchronous speculative decoding in one process: draft and verify take turns.
    Sd,
    /// Asynchronous multi-device speculative decoding: two worker processes, one per device.
    Amusd,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ar => "ar",
            Self::Sd => "sd",
            Self::Amusd => "amusd",
        }
    }
}

/// Which models run where; shared by `generate` and `bench`.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Verify model: PATH[:FORMAT] (a .gguf file or a Hugging Face directory; FORMAT is one of
    /// stored, f32, f16, bf16, q8_0, q4_0, q4_1, ...). Default: SmolLM2-135M-Instruct in f32.
    #[arg(long, value_name = "SPEC")]
    pub verify_model: Option<String>,
    /// Draft model: PATH[:FORMAT], lookup[:MIN-MAX] (prompt lookup alone, no model: the longest
    /// suffix of MAX down to MIN tokens found earlier proposes what followed it) or fake:...
    /// (tests). Default: SmolLM2-135M-Instruct as stored (q4_1 layers, q8_0 embedding), run by
    /// the integer kernels.
    #[arg(long, value_name = "SPEC")]
    pub draft_model: Option<String>,
    /// sd/amusd: prompt lookup ahead of the draft model: where it finds a match its tokens are
    /// proposed at once, elsewhere the model drafts. MIN-MAX: suffix lengths tried (default 2-4).
    #[arg(long, value_name = "MIN-MAX", num_args = 0..=1, default_missing_value = NgramRange::DEFAULT_TEXT)]
    pub draft_lookup: Option<NgramRange>,
    /// sd/amusd with prompt lookup: the longest lookup run proposed at once (runs grow with the
    /// lookup's right guesses up to this, and halve on a wrong one).
    #[arg(long, default_value_t = NgramRange::MAX_RUN, value_name = "N")]
    pub lookup_max_run: usize,
    /// Device of the verify model (and of the whole process for ar and sd).
    #[arg(long, default_value = "cpu:1")]
    pub verify_device: String,
    /// Device of the draft worker (amusd).
    #[arg(long, default_value = "cpu:0")]
    pub draft_device: String,
    /// sd: draft tokens proposed per verify step.
    #[arg(long, default_value_t = 5)]
    pub lookahead: usize,
    /// amusd: how far the draft may run ahead of the verified tokens.
    #[arg(long, default_value_t = 8)]
    pub max_lookahead: usize,
    /// amusd: most draft tokens one verify forward checks.
    #[arg(long, default_value_t = 16)]
    pub max_verify_batch: usize,
    /// amusd: how long the verify worker waits for a draft token before taking an autoregressive
    /// step itself, in microseconds. Default: 0 with a model draft (its next token is a forward
    /// away: waiting never paid); 300 with prompt lookup, whose next run is microseconds away.
    #[arg(long, value_name = "US")]
    pub verify_wait_us: Option<u64>,
    /// amusd: seconds a worker may take to load its model.
    #[arg(long, default_value_t = 300)]
    pub load_timeout_s: u64,
    /// amusd: a busy worker silent for this long is killed and restarted.
    #[arg(long, default_value_t = 10_000)]
    pub hang_timeout_ms: u64,
    /// amusd: restarts allowed per worker.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// amusd fault injection: kill a random worker at random moments, seeded.
    #[arg(long, value_name = "SEED")]
    pub chaos: Option<u64>,
    /// With --chaos: how many faults to inject per request at most.
    #[arg(long, default_value_t = 2)]
    pub chaos_faults: u32,
    /// With --chaos: the signal (kill, or stop, which the heartbeat check then catches).
    #[arg(long, value_enum, default_value = "kill")]
    pub chaos_signal: ChaosSignal,
    /// With --chaos: chance of a fault at each 20 ms supervision check.
    #[arg(long, default_value_t = 0.03)]
    pub chaos_rate: f64,
}

/// The verify worker's default wait for a draft token when prompt lookup drafts: a lookup run is
/// published within ~100 µs of the commit that woke the draft worker (futex wake, sync, lookup), so
/// a short wait takes a whole run instead of stepping alone, and costs ~2% of a verify step when
/// nothing comes. Measured on refactor prompts: 2.35 tokens per verify step against 2.08 without.
pub const LOOKUP_VERIFY_WAIT_US: u64 = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ChaosSignal {
    Kill,
    Stop,
    /// Either, chosen at random for each fault.
    Mixed,
}

impl ModelArgs {
    pub fn verify_spec(&self) -> Result<String> {
        match &self.verify_model {
            Some(s) => Ok(s.clone()),
            None => Ok(format!(
                "{}:f32",
                crate::assets::ensure_default_model()?.display()
            )),
        }
    }

    pub fn draft_spec(&self) -> Result<String> {
        match &self.draft_model {
            Some(s) => Ok(s.clone()),
            None => Ok(format!(
                "{}:stored",
                crate::assets::ensure_default_model()?.display()
            )),
        }
    }

    /// The lookup's n-gram range when it drafts alone (`--draft-model lookup[:MIN-MAX]`).
    pub fn lookup_alone(&self) -> Result<Option<NgramRange>> {
        match self
            .draft_model
            .as_deref()
            .and_then(amusd_spec::lookup::parse_spec)
        {
            Some(range) => {
                if self.draft_lookup.is_some() {
                    bail!("--draft-lookup adds prompt lookup to a draft model; with --draft-model lookup there is none: pass one of them");
                }
                Ok(Some(range?))
            }
            None => Ok(None),
        }
    }

    /// The in-process drafter (sd): prompt lookup alone, or the draft model with the lookup
    /// ahead of it if asked. `tokenizer`: the verify model's, whose vocabulary the draft must share.
    /// `wrap` wraps the decoder (`bench` times its forwards).
    pub fn drafter<D: Decoder>(
        &self,
        tokenizer: &Tokenizer,
        wrap: impl FnOnce(Box<dyn Decoder>) -> D,
    ) -> Result<Drafter<D>> {
        let max_run = self.lookup_max_run.max(1);
        if let Some(range) = self.lookup_alone()? {
            return Ok(Drafter::new(wrap(Box::new(NoModel))).with_lookup(range, true, max_run));
        }
        let draft = load_model(&self.draft_spec()?, "draft")?;
        check_same_vocabulary(tokenizer, &draft.tokenizer)?;
        let drafter = Drafter::new(wrap(Box::new(LlamaDecoder::new(draft.llama))));
        Ok(match self.draft_lookup {
            Some(range) => drafter.with_lookup(range, false, max_run),
            None => drafter,
        })
    }

    /// The verify worker's wait for a draft token (`--verify-wait-us`, or its default).
    pub fn verify_wait_us(&self) -> u64 {
        let lookup = self.draft_lookup.is_some()
            || self
                .draft_model
                .as_deref()
                .and_then(amusd_spec::lookup::parse_spec)
                .is_some();
        self.verify_wait_us
            .unwrap_or(if lookup { LOOKUP_VERIFY_WAIT_US } else { 0 })
    }

    /// How the draft is made, for summaries and bench records: `model`, `lookup MIN-MAX` or
    /// `model+lookup MIN-MAX`.
    pub fn drafter_label(&self) -> String {
        match (
            self.draft_model
                .as_deref()
                .and_then(amusd_spec::lookup::parse_spec),
            self.draft_lookup,
        ) {
            (Some(Ok(r)), _) => format!("lookup {r}"),
            (_, Some(r)) => format!("model+lookup {r}"),
            _ => "model".into(),
        }
    }

    pub fn verify_device(&self) -> Result<DeviceSpec> {
        parse_device(&self.verify_device)
    }

    pub fn draft_device(&self) -> Result<DeviceSpec> {
        parse_device(&self.draft_device)
    }
}

pub fn parse_device(s: &str) -> Result<DeviceSpec> {
    let d: DeviceSpec = s.parse()?;
    d.check_available()?;
    Ok(d)
}

/// How tokens are chosen; shared by `generate` and `bench`.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy decoding. Output stays identical across ar, sd and amusd
    /// for a given seed.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: u32,
    /// Keep the most likely tokens that make up probability P (1: off).
    #[arg(
        long,
        default_value_t = 1.0,
        value_name = "P",
        allow_hyphen_values = true
    )]
    pub top_p: f32,
    /// Keep tokens at least M times as likely as the most likely one (0: off).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "M",
        allow_hyphen_values = true
    )]
    pub min_p: f32,
    /// Seed of the sampling noise. Default with --temperature > 0: a random one, printed in the
    /// summary and the JSON output so the run can be repeated.
    #[arg(long)]
    pub seed: Option<u64>,
    /// sd/amusd: the draft proposes its greedy tokens instead of sampling with the same noise
    /// (llama.cpp's scheme; for comparing acceptance). Output is unchanged.
    #[arg(long)]
    pub greedy_draft: bool,
}

impl SamplingArgs {
    /// The validated parameters, with a random seed when sampling without one.
    pub fn resolve(&self) -> Result<RequestSampling> {
        let params = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: 0,
        };
        let mut params = params
            .validate()
            .map_err(|e| anyhow::anyhow!("bad sampling option: {e}"))?;
        if !params.is_greedy() {
            params.seed = self.seed.unwrap_or_else(rand::random);
        }
        Ok(RequestSampling {
            params,
            greedy_draft: self.greedy_draft,
        })
    }
}

/// The sampling parameters as printed in JSON output and bench records.
pub fn sampling_json(s: &RequestSampling) -> serde_json::Value {
    let p = &s.params;
    // Through their shortest decimal form, so 0.7 prints as 0.7, not as the f64 of an f32.
    let num = |x: f32| x.to_string().parse::<f64>().unwrap_or(f64::from(x));
    serde_json::json!({
        "temperature": num(p.temperature),
        "top_k": p.top_k,
        "top_p": num(p.top_p),
        "min_p": num(p.min_p),
        "seed": p.seed,
        "greedy_draft": s.greedy_draft,
    })
}

/// `greedy`, or the parameters that differ from greedy's, seed included.
pub fn sampling_label(s: &RequestSampling) -> String {
    let p = &s.params;
    if p.is_greedy() {
        return "greedy".into();
    }
    let mut out = format!("temperature {}", p.temperature);
    if p.top_k > 0 {
        out.push_str(&format!(", top-k {}", p.top_k));
    }
    if p.top_p < 1.0 {
        out.push_str(&format!(", top-p {}", p.top_p));
    }
    if p.min_p > 0.0 {
        out.push_str(&format!(", min-p {}", p.min_p));
    }
    out.push_str(&format!(", seed {}", p.seed));
    if s.greedy_draft {
        out.push_str(", greedy draft");
    }
    out
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// How to decode: the tool's own method by default, `ar` for the verify model alone.
    #[arg(long, value_enum, default_value = "amusd")]
    pub strategy: Strategy,
    /// The user's message (the chat template is applied unless --raw). Without --prompt or
    /// --prompt-file, the prompt is read from standard input when that is not a terminal.
    #[arg(long, short, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file (UTF-8); `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Feed the prompt to the model as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// System message (chat mode).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Print one JSON object (strategy, prompt tokens, token ids, text, metrics) instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// Token ids to use as the prompt instead of text (for fake test models).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Loads a model from a spec, with a spinner.
pub fn load_model(spec: &str, role: &str) -> Result<LoadedModel> {
    let spec: ModelSpec = spec.parse()?;
    let _spinner = Spinner::new(format!("loading {role} model {}", spec.path.display()));
    loader::load(&spec).with_context(|| format!("cannot load the {role} model"))
}

/// The prompt text from `--prompt` or `--prompt-file`.
pub fn prompt_text(args: &GenerateArgs) -> Result<String> {
    use std::io::{IsTerminal, Read};
    let stdin = std::path::Path::new("-");
    let file = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => return check_prompt(p.clone()),
        (None, Some(f)) => f.as_path(),
        (None, None) if !std::io::stdin().is_terminal() => stdin,
        (None, None) => bail!(
            "no prompt: pass --prompt TEXT or --prompt-file FILE, or pipe it to standard input"
        ),
    };
    let mut bytes = Vec::new();
    if file == stdin {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read the prompt from standard input")?;
    } else {
        bytes = std::fs::read(file)
            .with_context(|| format!("cannot read the prompt file {}", file.display()))?;
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "the prompt in {} is not valid UTF-8 (first bad byte at offset {}); convert it to UTF-8",
            if file == stdin { "standard input".to_string() } else { file.display().to_string() },
            e.utf8_error().valid_up_to()
        )
    })?;
    // `echo ... | amusd generate` should mean what `--prompt ...` means: the shell's newline is
    // not part of the message.
    let text = if file == stdin {
        text.trim_end_matches(['\n', '\r']).to_string()
    } else {
        text
    };
    check_prompt(text)
}

fn check_prompt(text: String) -> Result<String> {
    if text.trim().is_empty() {
        bail!("the prompt is empty: pass some text with --prompt, --prompt-file or standard input");
    }
    Ok(text)
}

/// Token ids of a conversation: rendered with the model's chat template (ChatML if it has none) and
/// tokenized without adding specials (the template writes them), or the raw text as is.
pub fn encode_conversation(
    tokenizer: &Tokenizer,
    template: Option<&amusd_model::chat::ChatTemplate>,
    messages: &[Message],
    raw: bool,
) -> Result<Vec<u32>> {
    if raw {
        let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        return Ok(tokenizer.encode(&text.join("\n"), true)?);
    }
    let fallback;
    let template = match template {
        Some(t) => t,
        None => {
            fallback = amusd_model::chat::ChatTemplate::chatml();
            &fallback
        }
    };
    let text = template.render(messages, true)?;
    Ok(tokenizer.encode(&text, false)?)
}

pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens 0 generates nothing; pass at least 1");
    }
    let sampling = args.sampling.resolve()?;
    let text = if args.prompt_ids.is_some() {
        String::new()
    } else {
        prompt_text(&args)?
    };
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(Message::system(s.clone()));
    }
    messages.push(Message::user(text));
    let m = &args.models;
    let verify_device = m.verify_device()?;
    if args.strategy == Strategy::Amusd {
        return crate::amusd::generate(&args, &messages, &sampling);
    }
    amusd_spec::bind::bind_current_process(verify_device)?;
    let verify = load_model(&m.verify_spec()?, "verify")?;
    let prompt = encode_conversation(
        &verify.tokenizer,
        verify.chat_template.as_ref(),
        &messages,
        args.raw,
    )?;
    let stop = StopCriteria {
        stop_ids: verify.eos_ids.clone(),
        max_new_tokens: args.max_new_tokens,
    };
    amusd_spec::generate::check_fits(
        verify.llama.config.max_position,
        prompt.len(),
        args.max_new_tokens,
    )?;
    let tokenizer = verify.tokenizer.clone();
    let mut stream = tokenizer.stream(true);
    let json = args.json;
    let mut on_tokens = |ids: &[u32]| {
        if !json {
            for &id in ids {
                if let Ok(piece) = stream.step(id) {
                    print_text(&piece);
                }
            }
        }
    };
    let mut verifier = Verifier::new(LlamaDecoder::new(verify.llama));
    let generation = match args.strategy {
        Strategy::Ar => autoregressive(&mut verifier, &prompt, &stop, &sampling, &mut on_tokens)?,
        Strategy::Sd => {
            let mut drafter = m.drafter(&tokenizer, |d| d)?;
            speculative(
                &mut verifier,
                &mut drafter,
                &prompt,
                &stop,
                &sampling,
                m.lookahead,
                &mut on_tokens,
            )?
        }
        Strategy::Amusd => unreachable!(),
    };
    let out = Output {
        strategy: args.strategy,
        prompt_tokens: prompt.len(),
        sampling: &sampling,
        drafter: m.drafter_label(),
        json,
    };
    finish_output(&out, &tokenizer, &generation)?;
    Ok(ExitCode::SUCCESS)
}

/// What a generation's output reports besides the generation itself.
pub struct Output<'a> {
    pub strategy: Strategy,
    pub prompt_tokens: usize,
    pub sampling: &'a RequestSampling,
    /// How sd and amusd draft ([`ModelArgs::drafter_label`]).
    pub drafter: String,
    pub json: bool,
}

/// Prints the trailing newline and summary, or the JSON object.
pub fn finish_output(out: &Output<'_>, tokenizer: &Tokenizer, g: &Generation) -> Result<()> {
    let text = tokenizer.decode(&g.tokens, true)?;
    if out.json {
        let json = serde_json::json!({
            "strategy": out.strategy.name(),
            "drafter": out.drafter,
            "prompt_tokens": out.prompt_tokens,
            "tokens": g.tokens,
            "text": text,
            "finish_reason": g.finish,
            "sampling": sampling_json(out.sampling),
            "metrics": summary_json(&g.metrics),
        });
        println!("{json}");
    } else {
        println!();
        let drafter = if out.strategy == Strategy::Ar {
            String::new()
        } else {
            format!("; {} draft", out.drafter)
        };
        eprintln!(
            "{}; {}{drafter}",
            summary_line(out.strategy, &g.metrics),
            sampling_label(out.sampling)
        );
    }
    Ok(())
}

pub fn summary_json(m: &amusd_spec::Metrics) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": m.prompt_tokens,
        "new_tokens": m.new_tokens,
        "ttft_ms": m.ttft * 1e3,
        "decode_ms_per_token": m.ms_per_token(),
        "tokens_per_s": if m.ms_per_token() > 0.0 { 1e3 / m.ms_per_token() } else { 0.0 },
        "total_time_s": m.total_time,
        "proposed": m.proposed,
        "accepted": m.accepted,
        "proposed_lookup": m.proposed_lookup,
        "accepted_lookup": m.accepted_lookup,
        "proposed_model": m.proposed - m.proposed_lookup,
        "accepted_model": m.accepted - m.accepted_lookup,
        "acceptance_rate": m.acceptance_rate(),
        "verify_steps": m.verify_steps,
        "tokens_per_verify_step": m.tokens_per_step(),
        "rollbacks": m.rollbacks,
    })
}

pub fn summary_line(strategy: Strategy, m: &amusd_spec::Metrics) -> String {
    let tps = if m.ms_per_token() > 0.0 {
        1e3 / m.ms_per_token()
    } else {
        0.0
    };
    let mut s = format!(
        "[{}] prompt {} tokens, generated {} tokens, ttft {:.0} ms, decode {:.1} ms/token ({:.1} tokens/s)",
        strategy.name(),
        m.prompt_tokens,
        m.new_tokens,
        m.ttft * 1e3,
        m.ms_per_token(),
        tps
    );
    if strategy != Strategy::Ar {
        s.push_str(&format!(
            "; drafted {}, accepted {} ({:.0}%), {:.2} tokens/verify step, {} rollbacks",
            m.proposed,
            m.accepted,
            100.0 * m.acceptance_rate(),
            m.tokens_per_step(),
            m.rollbacks
        ));
        if m.proposed_lookup > 0 {
            s.push_str(&format!(
                "; by source: lookup {}/{} accepted, model {}/{}",
                m.accepted_lookup,
                m.proposed_lookup,
                m.accepted - m.accepted_lookup,
                m.proposed - m.proposed_lookup
            ));
        }
    }
    s
}

/// Draft and verify must share one vocabulary, token for token, or draft ids mean nothing to the
/// verify model.
pub fn check_same_vocabulary(verify: &Tokenizer, draft: &Tokenizer) -> Result<()> {
    let (v, d) = (verify.vocab_size(), draft.vocab_size());
    if v != d {
        bail!("vocabulary mismatch: the verify model has {v} tokens, the draft {d}; pick a draft from the same model family");
    }
    for id in 0..v as u32 {
        if verify.id_to_token(id) != draft.id_to_token(id) {
            bail!(
                "vocabulary mismatch at token {id} ({:?} vs {:?}); pick a draft from the same model family",
                verify.id_to_token(id),
                draft.id_to_token(id)
            );
        }
    }
    Ok(())
}
