//! The options `generate` and `bench` share: strategy, models and devices, sampling.

use amusd_model::qkernels::{IntActivations, Path};
use amusd_model::{DeviceSpec, HeadChoice, KvPrecision, ModelSpec};
use std::path::PathBuf;

use amusd_spec::constraint::{Grammar, GrammarKind};
use amusd_spec::fake::FakeModel;
use amusd_spec::lookup::{self, NgramRange};
use amusd_spec::{Dry, LogitBias, Penalties, RequestSampling, SamplingParams};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    /// Autoregressive greedy decoding with the verify model alone.
    Ar,
    /// Synchronous speculative decoding in one process: draft and verify take turns.
    Sd,
    /// Asynchronous multi-device speculative decoding: two worker processes, one per device.
    Amusd,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;

    /// `ar`, `sd` or `amusd`, as the command line's `--strategy` takes them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as ValueEnum>::from_str(s, false)
    }
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ar => "ar",
            Self::Sd => "sd",
            Self::Amusd => "amusd",
        }
    }

    /// The most tokens a request (prompt and answer) can hold apart from the models' contexts:
    /// amusd's shared token buffer; none in process.
    pub fn token_limit(self) -> usize {
        match self {
            Self::Amusd => amusd_shm::TOKEN_CAPACITY,
            Self::Ar | Self::Sd => usize::MAX,
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
    /// Draft model: PATH[:FORMAT][:head=HEAD][:kv=f16|f32][:acts=8|16][:bulk=8|16], lookup[:MIN-MAX] (prompt lookup
    /// alone, no model: the longest suffix of MAX down to MIN tokens found earlier proposes what
    /// followed it) or fake:... (tests). HEAD is how the draft scores the vocabulary: screen[:K]
    /// (the default; a q4_0 copy of the output head picks K candidates, 32 unless given, and the
    /// head as stored scores them, ~half the head's bytes), full (the whole head as stored), or N
    /// (only the N most frequent token ids, by a built-in ranking for the default model's
    /// vocabulary, else the first N ids). kv: what the draft's KV cache stores (default f16, half
    /// the bytes attention reads). acts: the integer kernels' activation bits (default 16: each
    /// row and its 8-bit residual; the draft then proposes the verify model's token far more
    /// often; 8: GGUF's, sd's default). bulk: the activation bits of a long prompt's bulk, all but
    /// its last 32 positions (under amusd 8 by default on CPUs without AVX-512 VNNI: the draft's
    /// prefill then takes about half the time and it starts ahead of the verify model; otherwise
    /// as acts). Default:
    /// SmolLM2-135M-Instruct as stored (q4_1 layers, q8_0 embedding), run by the integer kernels.
    #[arg(long, value_name = "SPEC")]
    pub draft_model: Option<String>,
    /// A Jinja chat template to render conversations with instead of the verify model's
    /// (llama.cpp's --chat-template-file, vLLM's --chat-template); it sees the model's BOS and EOS
    /// strings.
    #[arg(long, value_name = "FILE")]
    pub chat_template_file: Option<PathBuf>,
    /// sd/amusd: prompt lookup ahead of the draft model, on by default: where it finds a match,
    /// the draft model checks the lookup's run in one forward and proposes the part it agrees
    /// with plus its own next token; elsewhere it drafts one token. MIN-MAX: suffix lengths tried
    /// (default 2-4).
    #[arg(long, value_name = "MIN-MAX", num_args = 0..=1, default_missing_value = NgramRange::DEFAULT_TEXT)]
    pub draft_lookup: Option<NgramRange>,
    /// sd/amusd: draft with the model alone, no prompt lookup ahead of it.
    #[arg(long, conflicts_with = "draft_lookup")]
    pub no_draft_lookup: bool,
    /// sd/amusd with prompt lookup: the longest lookup run proposed at once (runs grow with the
    /// lookup's streak of right guesses up to this, and drop back on a wrong one: to two guesses
    /// ahead of the draft model, to one when the lookup drafts alone).
    #[arg(long, default_value_t = NgramRange::MAX_RUN, value_name = "N")]
    pub lookup_max_run: usize,
    /// sd/amusd with prompt lookup ahead of the draft model: no n-gram history. By default, where
    /// the lookup finds no match in the request, the draft model also checks a short run guessed
    /// from what followed the last two or three tokens in every request the drafter has served
    /// (llama.cpp's dynamic n-gram cache, in 6 MiB), in the forward that drafts its own token.
    #[arg(long)]
    pub no_draft_history: bool,
    /// amusd: the verify model prefills every prompt alone. By default, when the draft is the
    /// verify model's checkpoint, the draft worker computes the first positions of each prompt's
    /// prefill (half of the work: 51% of 191 positions, 59% of 2,832) in the verify model's
    /// arithmetic (the same bits, ~half the time to the first token; with the draft's own
    /// matrices where it keeps the checkpoint as stored, else a
    /// second copy of the verify model), then drafts from the verify model's keys and values
    /// instead of prefilling itself.
    #[arg(long)]
    pub no_split_prefill: bool,
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
    #[arg(long, default_value_t = amusd_spec::worker::DEFAULT_MAX_LOOKAHEAD)]
    pub max_lookahead: usize,
    /// amusd: most draft tokens one verify forward checks.
    #[arg(long, default_value_t = amusd_spec::worker::DEFAULT_MAX_VERIFY_BATCH)]
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
    /// amusd: restarts allowed per worker within one request (a completed request gives them back).
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
    /// No spinner while the models load (a program that embeds [`crate::Engine`] owns its
    /// terminal).
    #[arg(skip)]
    pub quiet: bool,
    /// Where the worker binaries are; by default beside the running executable, or in its parent
    /// directory (cargo's `deps/` and `examples/` lie one below the binaries).
    #[arg(skip)]
    pub worker_dir: Option<PathBuf>,
}

/// The verify worker's default wait for a draft token when prompt lookup drafts: a lookup run is
/// published within ~100 µs of the commit that woke the draft worker (futex wake, sync, lookup), so
/// a short wait takes a whole run instead of stepping alone, and costs ~2% of a verify step when
/// nothing comes (see the README).
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
            Some(s)
                if s.parse::<ModelSpec>()
                    .is_ok_and(|m| !matches!(m.head, None | Some(HeadChoice::Whole))) =>
            {
                bail!(
                    "--verify-model {s}: head=N and head=screen approximate a draft model's \
                     proposals; the verify model's logits decide the output and must be exact \
                     over the whole vocabulary"
                )
            }
            Some(s) => Ok(s.clone()),
            None => Ok(format!(
                "{}:f32",
                crate::assets::ensure_default_model()?.display()
            )),
        }
    }

    /// The draft's spec for `strategy`, its head screened ([`amusd_model::screen`]) unless it
    /// says `head=...` and its KV cache f16 unless it says `kv=...`: a draft only needs its top
    /// token right, and both find it reading fewer bytes. Unless it says `acts=...`, its integer
    /// kernels take 16-bit activations under amusd (its top token is then the verify model's at
    /// 99.9% of positions instead of 96%, and a one-row forward on its own core costs about the
    /// same) and 8-bit ones under sd, where its wider forwards, twice the arithmetic at 16 bits,
    /// take turns with the verify model on one core (measured: level or slower end to end; see
    /// `amusd_model::qkernels::IntActivations` and the README). Under amusd a long prompt's bulk
    /// takes [`default_bulk`] bits unless it says `bulk=...` ([`amusd_model::Llama::prefill_bulk`]).
    pub fn draft_spec(&self, strategy: Strategy) -> Result<String> {
        let given = match &self.draft_model {
            Some(s) if lookup::parse_spec(s).is_some() || FakeModel::is_fake(s) => {
                return Ok(s.clone())
            }
            Some(s) => s.clone(),
            None => format!(
                "{}:stored",
                crate::assets::ensure_default_model()?.display()
            ),
        };
        let mut spec: ModelSpec = given.parse()?;
        spec.head
            .get_or_insert(HeadChoice::Screened(amusd_model::screen::DEFAULT_KEEP));
        spec.kv.get_or_insert(KvPrecision::F16);
        spec.acts.get_or_insert(match strategy {
            Strategy::Amusd => IntActivations::Bits16,
            Strategy::Ar | Strategy::Sd => IntActivations::Bits8,
        });
        if strategy == Strategy::Amusd {
            spec.bulk.get_or_insert(default_bulk(Path::detect()));
        }
        Ok(spec.to_string())
    }

    /// `--draft-model lookup[:MIN-MAX]`, parsed: the lookup drafts alone.
    fn alone_spec(&self) -> Option<Result<NgramRange, lookup::BadRange>> {
        self.draft_model.as_deref().and_then(lookup::parse_spec)
    }

    /// The lookup's n-gram range when it drafts alone (`--draft-model lookup[:MIN-MAX]`).
    pub fn lookup_alone(&self) -> Result<Option<NgramRange>> {
        match self.alone_spec() {
            Some(range) => {
                if self.draft_lookup.is_some() {
                    bail!("--draft-lookup adds prompt lookup to a draft model, and --draft-model lookup has none: pass one of them");
                }
                Ok(Some(range?))
            }
            None => Ok(None),
        }
    }

    /// The lookup's n-gram range ahead of the draft model: on unless `--no-draft-lookup` or the
    /// lookup drafts alone. On by default because checking a run costs one forward of the draft
    /// model and makes every draft token the model's own (README, "Prompt lookup").
    pub fn lookup_ahead(&self) -> Option<NgramRange> {
        if self.alone_spec().is_some() || self.no_draft_lookup {
            return None;
        }
        Some(self.draft_lookup.unwrap_or(NgramRange::DEFAULT))
    }

    /// Whether the n-gram history across requests drafts beside the lookup ahead of the model.
    pub fn draft_history(&self) -> bool {
        self.lookup_ahead().is_some() && !self.no_draft_history
    }

    /// Whether the workers split prompts' prefills (amusd, `--no-split-prefill`): only where
    /// the draft is the verify model's checkpoint, whose keys and values it can then adopt.
    pub fn split_prefill(&self, verify_spec: &str, draft_spec: &str) -> bool {
        let file = |spec: &str| {
            let spec: ModelSpec = spec.parse().ok()?;
            std::fs::canonicalize(spec.path).ok()
        };
        let same = file(verify_spec).is_some_and(|v| file(draft_spec) == Some(v));
        !self.no_split_prefill && self.alone_spec().is_none() && same
    }

    /// Whether prompt lookup drafts, alone or ahead of the model.
    pub fn uses_lookup(&self) -> bool {
        self.alone_spec().is_some() || self.lookup_ahead().is_some()
    }

    /// The verify worker's wait for a draft token (`--verify-wait-us`, or its default).
    pub fn verify_wait_us(&self) -> u64 {
        let default = if self.uses_lookup() {
            LOOKUP_VERIFY_WAIT_US
        } else {
            0
        };
        self.verify_wait_us.unwrap_or(default)
    }

    /// How the draft is made, for summaries and bench records: `model`, `lookup MIN-MAX`,
    /// `model+lookup MIN-MAX` or `model+lookup MIN-MAX+history`.
    pub fn drafter_label(&self) -> String {
        match (self.alone_spec(), self.lookup_ahead()) {
            (Some(Ok(r)), _) => format!("lookup {r}"),
            (_, Some(r)) if self.draft_history() => format!("model+lookup {r}+history"),
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
    /// Keep tokens within N standard deviations of the largest logit (llama.cpp's
    /// --top-n-sigma; 0 or less: off).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "N",
        allow_hyphen_values = true
    )]
    pub top_n_sigma: f32,
    /// Dynamic temperature: each position samples at a temperature from T - R to T + R by how
    /// spread its distribution is (llama.cpp's --dynatemp-range; 0: off).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "R",
        allow_hyphen_values = true
    )]
    pub dynatemp_range: f32,
    /// The dynamic temperature's exponent: how the spread maps onto the range (1: linearly).
    #[arg(
        long = "dynatemp-exp",
        default_value_t = 1.0,
        value_name = "E",
        allow_hyphen_values = true
    )]
    pub dynatemp_exponent: f32,
    /// Locally typical sampling: keep the tokens nearest the expected information content, P of
    /// the probability mass (as llama.cpp's --typical; 1: off).
    #[arg(
        long = "typical",
        default_value_t = 1.0,
        value_name = "P",
        allow_hyphen_values = true
    )]
    pub typical_p: f32,
    /// XTC: at this share of positions, drop every token at least --xtc-threshold likely but the
    /// least likely of them (as llama.cpp's; 0: off).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "P",
        allow_hyphen_values = true
    )]
    pub xtc_probability: f32,
    /// XTC's threshold: the probability from which a token is a top choice.
    #[arg(
        long,
        default_value_t = 0.1,
        value_name = "T",
        allow_hyphen_values = true
    )]
    pub xtc_threshold: f32,
    /// Seed of the sampling noise. Default with --temperature > 0: a random one, printed in the
    /// summary and the JSON output so the run can be repeated.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Divide the logit of each token seen in the last --repeat-last-n tokens by R if positive,
    /// multiply it by R if not, as llama.cpp does (1: off). Greedy or not.
    #[arg(long, default_value_t = 1.0, value_name = "R")]
    pub repeat_penalty: f32,
    /// Lower the logit of each token seen in the last --repeat-last-n tokens by F per occurrence
    /// (-2 to 2; 0: off).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "F",
        allow_hyphen_values = true
    )]
    pub frequency_penalty: f32,
    /// Lower the logit of each token seen in the last --repeat-last-n tokens by P once (-2 to 2;
    /// 0: off).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "P",
        allow_hyphen_values = true
    )]
    pub presence_penalty: f32,
    /// The penalties' window: the last N tokens, the prompt's included (0: no penalty; -1: the
    /// whole sequence).
    #[arg(
        long,
        default_value_t = 64,
        value_name = "N",
        allow_hyphen_values = true
    )]
    pub repeat_last_n: i64,
    /// Add BIAS to token ID's logit, before the penalties and the temperature, greedy or not:
    /// `ID+BIAS` or `ID-BIAS` (BIAS up to 100, or `inf` with `-` to ban the token), as llama.cpp
    /// takes it; repeat for more tokens.
    #[arg(
        long,
        value_name = "ID(+|-)BIAS",
        allow_hyphen_values = true,
        value_parser = parse_logit_bias
    )]
    pub logit_bias: Vec<(u32, f32)>,
    #[command(flatten)]
    pub dry: DryArgs,
    #[command(flatten)]
    pub grammar: GrammarArgs,
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
            dynatemp_range: self.dynatemp_range,
            dynatemp_exponent: self.dynatemp_exponent,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            top_n_sigma: self.top_n_sigma,
            typical_p: self.typical_p,
            xtc_probability: self.xtc_probability,
            xtc_threshold: self.xtc_threshold,
            seed: 0,
            penalties: Penalties {
                repeat: self.repeat_penalty,
                frequency: self.frequency_penalty,
                presence: self.presence_penalty,
                last_n: penalty_window("--repeat-last-n", self.repeat_last_n)?,
            },
            logit_bias: LogitBias::new(self.logit_bias.iter().copied())
                .map_err(|e| anyhow::anyhow!("bad sampling option: {e}"))?,
            dry: self.dry.dry()?,
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
            no_draft_lookup: false,
            // One request per run (generate), or as the bench decides turn by turn.
            cache_prompt: false,
            logprobs: None,
            prompt_logprobs: false,
            grammar: self.grammar.resolve()?,
        })
    }
}

/// Structured output: a grammar the generated text follows (at most one of these).
#[derive(Args, Debug, Clone, Default)]
#[group(multiple = false)]
pub struct GrammarArgs {
    /// The output is a JSON object (any).
    #[arg(long)]
    pub json_object: bool,
    /// The output is JSON that fits this JSON schema (as llama.cpp's --json-schema).
    #[arg(long, value_name = "SCHEMA")]
    pub json_schema: Option<String>,
    /// --json-schema read from a file.
    #[arg(long, value_name = "FILE")]
    pub json_schema_file: Option<PathBuf>,
    /// The output matches this regular expression (Rust's regex syntax), whole.
    #[arg(long, value_name = "RE")]
    pub regex: Option<String>,
    /// The output follows this Lark grammar (llguidance's syntax; the start rule is `start`).
    #[arg(long, value_name = "FILE")]
    pub lark_file: Option<PathBuf>,
    /// The output follows this GBNF grammar (llama.cpp's --grammar; the start rule is `root`).
    #[arg(long, value_name = "GBNF")]
    pub grammar: Option<String>,
    /// --grammar read from a file (llama.cpp's --grammar-file).
    #[arg(long, value_name = "FILE")]
    pub grammar_file: Option<PathBuf>,
}

impl GrammarArgs {
    pub fn resolve(&self) -> Result<Option<Grammar>> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        Ok(if self.json_object {
            Some(Grammar::new(GrammarKind::JsonObject, ""))
        } else if let Some(s) = &self.json_schema {
            Some(Grammar::new(GrammarKind::JsonSchema, s.clone()))
        } else if let Some(p) = &self.json_schema_file {
            Some(Grammar::new(GrammarKind::JsonSchema, read(p)?))
        } else if let Some(r) = &self.regex {
            Some(Grammar::new(GrammarKind::Regex, r.clone()))
        } else if let Some(p) = &self.lark_file {
            Some(Grammar::new(GrammarKind::Lark, read(p)?))
        } else if let Some(g) = &self.grammar {
            Some(Grammar::new(GrammarKind::Gbnf, g.clone()))
        } else if let Some(p) = &self.grammar_file {
            Some(Grammar::new(GrammarKind::Gbnf, read(p)?))
        } else {
            None
        })
    }
}

/// A `--logit-bias` value, `ID+BIAS` or `ID-BIAS` (llama.cpp's form; `-inf` bans).
fn parse_logit_bias(s: &str) -> Result<(u32, f32), String> {
    let at = s.find(['+', '-']).ok_or_else(|| {
        format!("expected ID+BIAS or ID-BIAS, e.g. 15043+1.5 or 2-inf; got {s:?}")
    })?;
    let (id, bias) = s.split_at(at);
    let id = id
        .parse()
        .map_err(|_| format!("{id:?} is not a token id (in {s:?})"))?;
    let bias: f32 = bias
        .parse()
        .map_err(|_| format!("{bias:?} is not a number (in {s:?})"))?;
    Ok((id, bias))
}

/// A `repeat_last_n` as llama.cpp takes it (-1: the whole sequence) as [`Penalties::last_n`].
pub fn penalty_window(flag: &str, n: i64) -> Result<u32> {
    match n {
        -1 => Ok(u32::MAX),
        0.. => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
        _ => anyhow::bail!("bad sampling option: {flag} must be -1 or more, got {n}"),
    }
}

/// DRY, as llama.cpp's flags of the same names.
#[derive(Args, Debug, Clone)]
pub struct DryArgs {
    /// DRY: lower the logit of a token that would extend a repetition of n tokens by
    /// M * BASE^(n - ALLOWED), n >= ALLOWED (0: off). Greedy or not.
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "M",
        allow_hyphen_values = true
    )]
    pub dry_multiplier: f32,
    /// DRY's base (1 to 4).
    #[arg(
        long,
        default_value_t = 1.75,
        value_name = "BASE",
        allow_hyphen_values = true
    )]
    pub dry_base: f32,
    /// DRY's allowed length: shorter repetitions go unpenalized.
    #[arg(long, default_value_t = 2, value_name = "ALLOWED")]
    pub dry_allowed_length: u32,
    /// DRY's window: the last N tokens, the prompt's included (0: off; -1: the whole sequence).
    #[arg(long, default_value_t = -1, value_name = "N", allow_hyphen_values = true)]
    pub dry_penalty_last_n: i64,
    /// A string that ends a repetition (a token whose text holds it breaks the run; `\n`, `\t`,
    /// `\"` and `\\` read as escapes); repeat for more, "none" for none. Default: newline,
    /// colon, double quote, asterisk, as llama.cpp's.
    #[arg(long, value_name = "S")]
    pub dry_sequence_breaker: Vec<String>,
}

impl Default for DryArgs {
    fn default() -> Self {
        Self {
            dry_multiplier: 0.0,
            dry_base: 1.75,
            dry_allowed_length: 2,
            dry_penalty_last_n: -1,
            dry_sequence_breaker: Vec::new(),
        }
    }
}

impl DryArgs {
    /// The parameters; the breaker set stays empty until a tokenizer finds it
    /// ([`crate::prompt::Texts::with_dry_breakers`]).
    pub fn dry(&self) -> Result<Dry> {
        Ok(Dry {
            multiplier: self.dry_multiplier,
            base: self.dry_base,
            allowed_length: self.dry_allowed_length,
            last_n: penalty_window("--dry-penalty-last-n", self.dry_penalty_last_n)?,
            breakers: Vec::new(),
        })
    }

    /// The breaker strings, escapes read.
    pub fn breakers(&self) -> Vec<String> {
        match &self.dry_sequence_breaker[..] {
            [] => amusd_spec::dry::DEFAULT_BREAKERS.map(String::from).to_vec(),
            [none] if none == "none" => Vec::new(),
            given => given.iter().map(|s| unescape(s)).collect(),
        }
    }
}

/// `\n`, `\t`, `\r`, `\"` and `\\` as the characters they name (llama.cpp reads its breakers
/// so); any other backslash stays.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(e @ ('"' | '\\')) => out.push(e),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// The sampling parameters as printed in JSON output and bench records.
pub fn sampling_json(s: &RequestSampling) -> serde_json::Value {
    let p = &s.params;
    // Through their shortest decimal form, so 0.7 prints as 0.7, not as the f64 of an f32.
    let num = |x: f32| x.to_string().parse::<f64>().unwrap_or(f64::from(x));
    serde_json::json!({
        "temperature": num(p.temperature),
        "dynatemp_range": num(p.dynatemp_range),
        "dynatemp_exponent": num(p.dynatemp_exponent),
        "top_k": p.top_k,
        "top_p": num(p.top_p),
        "min_p": num(p.min_p),
        "top_n_sigma": num(p.top_n_sigma),
        "typical_p": num(p.typical_p),
        "xtc_probability": num(p.xtc_probability),
        "xtc_threshold": num(p.xtc_threshold),
        "seed": p.seed,
        "greedy_draft": s.greedy_draft,
        "repeat_penalty": num(p.penalties.repeat),
        "frequency_penalty": num(p.penalties.frequency),
        "presence_penalty": num(p.penalties.presence),
        "repeat_last_n": match p.penalties.last_n {
            u32::MAX => -1,
            n => i64::from(n),
        },
        "logit_bias": logit_bias_json(&p.logit_bias),
        "dry": (!p.dry.is_off()).then(|| serde_json::json!({
            "multiplier": num(p.dry.multiplier),
            "base": num(p.dry.base),
            "allowed_length": p.dry.allowed_length,
            "penalty_last_n": match p.dry.last_n {
                u32::MAX => -1,
                n => i64::from(n),
            },
            "breaker_tokens": p.dry.breakers.iter().map(|w| w.count_ones()).sum::<u32>(),
        })),
        "grammar": s.grammar.as_ref().map(|g| serde_json::json!({
            "type": g.kind.tag(),
            "text": g.text,
        })),
    })
}

/// A logit bias as OpenAI writes it: token ids (as strings) to biases; `-inf` as `null`.
pub fn logit_bias_json(b: &LogitBias) -> serde_json::Value {
    let num = |x: f32| x.to_string().parse::<f64>().ok().filter(|x| x.is_finite());
    (b.entries().iter())
        .map(|&(token, bias)| (token.to_string(), serde_json::json!(num(bias))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `greedy`, or the parameters that differ from greedy's, seed included.
pub fn sampling_label(s: &RequestSampling) -> String {
    let p = &s.params;
    let mut out = match p.is_greedy() {
        true => "greedy".to_string(),
        false => format!("temperature {}", p.temperature),
    };
    out.push_str(&penalties_label(&p.penalties));
    if !p.dry.is_off() {
        out.push_str(&format!(
            ", DRY {} x {}^(n - {})",
            p.dry.multiplier, p.dry.base, p.dry.allowed_length
        ));
    }
    if !p.logit_bias.is_empty() {
        out.push_str(&format!(
            ", logit bias on {} tokens",
            p.logit_bias.entries().len()
        ));
    }
    if let Some(g) = &s.grammar {
        out.push_str(&format!(", grammar: {g}"));
    }
    if p.is_greedy() {
        return out;
    }
    if p.top_k > 0 {
        out.push_str(&format!(", top-k {}", p.top_k));
    }
    if p.top_p < 1.0 {
        out.push_str(&format!(", top-p {}", p.top_p));
    }
    if p.min_p > 0.0 {
        out.push_str(&format!(", min-p {}", p.min_p));
    }
    if p.top_n_sigma > 0.0 {
        out.push_str(&format!(", top-n-sigma {}", p.top_n_sigma));
    }
    if p.dynatemp_range > 0.0 {
        out.push_str(&format!(
            ", dynamic temperature +-{} (exponent {})",
            p.dynatemp_range, p.dynatemp_exponent
        ));
    }
    if p.typical_p < 1.0 {
        out.push_str(&format!(", typical-p {}", p.typical_p));
    }
    if p.xtc_probability > 0.0 {
        out.push_str(&format!(
            ", XTC {} above {}",
            p.xtc_probability, p.xtc_threshold
        ));
    }
    out.push_str(&format!(", seed {}", p.seed));
    if s.greedy_draft {
        out.push_str(", greedy draft");
    }
    out
}

/// The penalties that are on, each after a comma; empty when none is.
fn penalties_label(p: &Penalties) -> String {
    if p.is_off() {
        return String::new();
    }
    let mut out = String::new();
    if p.repeat != 1.0 {
        out.push_str(&format!(", repeat penalty {}", p.repeat));
    }
    if p.frequency != 0.0 {
        out.push_str(&format!(", frequency penalty {}", p.frequency));
    }
    if p.presence != 0.0 {
        out.push_str(&format!(", presence penalty {}", p.presence));
    }
    match p.last_n {
        u32::MAX => out.push_str(" (whole sequence)"),
        n => out.push_str(&format!(" (last {n} tokens)")),
    }
    out
}

/// The activation bits of a draft's prompt bulk under amusd, by the draft's integer kernels: 8
/// without VNNI, where 16 bits cost twice the arithmetic and the draft's prefill ran behind the
/// f32 verify model's (AVX2 EPYC: HumanEval 72.8 -> 81.4 tokens/s end to end with 8 bits, at a
/// little agreement), 16 with it, where the 16-bit prefill keeps up anyway and 8-bit cache entries
/// only cost agreement (Zen 4: 100% against 94-96% accepted, HumanEval 124.7 / 127.4 -> 138.0 /
/// 138.3 tokens/s, MT-Bench 160.5 / 160.2 -> 196.3 / 184.9; see the README).
fn default_bulk(path: Path) -> IntActivations {
    match path {
        Path::Avx512Vnni => IntActivations::Bits16,
        Path::Avx2 | Path::Portable => IntActivations::Bits8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_strategy_reads_back_as_it_prints() {
        for s in [Strategy::Ar, Strategy::Sd, Strategy::Amusd] {
            assert_eq!(s.to_string().parse::<Strategy>(), Ok(s));
        }
        assert!("fast".parse::<Strategy>().is_err());
    }
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        models: ModelArgs,
    }

    fn draft_spec(given: &str, strategy: Strategy) -> String {
        let cli = Cli::parse_from(["amusd", "--draft-model", given]);
        cli.models.draft_spec(strategy).unwrap()
    }

    /// A draft screens its head, stores an f16 cache and takes 16-bit activations under amusd
    /// (8-bit under sd), [`default_bulk`] in a prompt's bulk under amusd, unless its spec says
    /// otherwise; what it says stays.
    #[test]
    fn a_draft_spec_gets_the_draft_defaults_it_does_not_override() {
        let bulk = default_bulk(Path::detect());
        assert_eq!(
            draft_spec("m.gguf:stored", Strategy::Amusd),
            format!("m.gguf:stored:head=screen:32:kv=f16:acts=16:bulk={bulk}")
        );
        assert_eq!(
            draft_spec("m.gguf:stored", Strategy::Sd),
            "m.gguf:stored:head=screen:32:kv=f16:acts=8"
        );
        assert_eq!(
            draft_spec("m.gguf:q8_0:head=full:kv=f32:acts=16", Strategy::Amusd),
            format!("m.gguf:q8_0:head=full:kv=f32:acts=16:bulk={bulk}")
        );
        for strategy in [Strategy::Sd, Strategy::Amusd] {
            assert_eq!(
                draft_spec("m.gguf:q8_0:head=full:kv=f32:acts=16:bulk=16", strategy),
                "m.gguf:q8_0:head=full:kv=f32:acts=16:bulk=16"
            );
            assert_eq!(draft_spec("lookup:2-4", strategy), "lookup:2-4");
        }
    }

    /// A prompt's bulk takes 16 bits only where VNNI makes them cheap.
    #[test]
    fn the_bulk_takes_8_bits_only_without_vnni() {
        assert_eq!(default_bulk(Path::Avx512Vnni), IntActivations::Bits16);
        assert_eq!(default_bulk(Path::Avx2), IntActivations::Bits8);
        assert_eq!(default_bulk(Path::Portable), IntActivations::Bits8);
    }

    #[derive(Parser)]
    struct SamplingCli {
        #[command(flatten)]
        sampling: SamplingArgs,
    }

    fn sampling(args: &[&str]) -> Result<RequestSampling> {
        let cli =
            SamplingCli::try_parse_from(std::iter::once("amusd").chain(args.iter().copied()))?;
        cli.sampling.resolve()
    }

    /// The penalties reach the parameters, llama.cpp's -1 window means the whole sequence, and
    /// out-of-range values are refused with the option's meaning.
    #[test]
    fn penalty_options_are_parsed_and_checked() {
        let s = sampling(&["--repeat-penalty", "1.2", "--frequency-penalty", "-0.5"]).unwrap();
        let p = s.params.penalties;
        assert_eq!(
            (p.repeat, p.frequency, p.presence, p.last_n),
            (1.2, -0.5, 0.0, 64)
        );
        assert_eq!(
            sampling_label(&s),
            "greedy, repeat penalty 1.2, frequency penalty -0.5 (last 64 tokens)"
        );
        let all = sampling(&["--presence-penalty", "1", "--repeat-last-n", "-1"]).unwrap();
        assert_eq!(all.params.penalties.last_n, u32::MAX);
        assert_eq!(sampling_json(&all)["repeat_last_n"], -1);
        assert_eq!(sampling_label(&sampling(&[]).unwrap()), "greedy");
        for bad in [
            &["--repeat-penalty", "0"][..],
            &["--frequency-penalty", "3"],
            &["--repeat-last-n", "-2"],
        ] {
            let e = sampling(bad).unwrap_err().to_string();
            assert!(e.contains("bad sampling option"), "{bad:?}: {e}");
        }
    }

    /// `--logit-bias` takes llama.cpp's `ID+BIAS` / `ID-BIAS` (`-inf` bans), repeated; the bias
    /// reaches the parameters, the label and the JSON, and bad values are refused.
    #[test]
    fn logit_bias_options_are_parsed_and_checked() {
        let s = sampling(&["--logit-bias", "15043+1.5", "--logit-bias", "2-inf"]).unwrap();
        let b = s.params.logit_bias.entries();
        assert_eq!(b, [(2, f32::NEG_INFINITY), (15043, 1.5)]);
        assert!(!s.params.is_plain_greedy());
        assert_eq!(sampling_label(&s), "greedy, logit bias on 2 tokens");
        let json = sampling_json(&s);
        assert_eq!(
            json["logit_bias"],
            serde_json::json!({"2": null, "15043": 1.5})
        );
        for bad in [
            &["--logit-bias", "15043"][..],
            &["--logit-bias", "x+1"],
            &["--logit-bias", "7+abc"],
        ] {
            let e = sampling(bad).unwrap_err().to_string();
            assert!(e.contains("--logit-bias"), "{bad:?}: {e}");
        }
        for bad in [
            &["--logit-bias", "7+101"][..],
            &["--logit-bias", "7+inf"],
            &["--logit-bias", "7+1", "--logit-bias", "7-1"],
        ] {
            let e = sampling(bad).unwrap_err().to_string();
            assert!(e.contains("bad sampling option"), "{bad:?}: {e}");
        }
    }
}
