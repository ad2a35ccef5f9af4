//! `amusd bench`: runs a dataset through several strategies, checks that they agree token for token,
//! records the paper's per-sample metrics, and optionally draws a timeline of one sample;
//! `amusd report`: the paper-style table from those records.
//!
//! # Datasets
//!
//! Every sample is a conversation that ends with a user turn; the model's (greedy) answer to it is one
//! *generation*. Some samples ask follow-up questions after the model's own answer.
//!
//! - `humaneval`: the 164 HumanEval prompts, each as one user turn "Complete the following Python
//!   function: ```python {prompt}```". Fetched on first use into
//!   `$AMUSD_HOME/datasets/HumanEval.jsonl.gz` (`scripts/fetch-assets.sh humaneval`).
//! - `mt-bench`: the 80 MT-Bench questions with both turns, from
//!   `$AMUSD_HOME/datasets/mt_bench/question.jsonl` (`scripts/fetch-assets.sh mt-bench`). As MT-Bench
//!   does, the second question is asked after the model's own answer to the first: conversation
//!   `[user q1, assistant <turn-1 answer>, user q2]`. Each strategy uses its *own* turn-1 answer: the
//!   exactness check makes it equal to ar's (and reports it when it is not), so the turn-2 prompts are
//!   identical across strategies without any strategy depending on another's run. **Each turn is its
//!   own record** (`turn` 1 or 2, same `sample_index`): a turn has its own time to first token and its
//!   own decode rate, which a sum of both would blur.
//! - `refactor`: a deterministic **stand-in** for the paper's RefactorChat, which is not reachable from
//!   here (it is named `refactor-standin` in every record and table). Sample `i` pastes HumanEval task
//!   `i`'s reference solution (prompt + canonical_solution) and asks for 1 to 3 refactorings in turn
//!   (`1 + i % 3` of them, picked by rotating through a fixed list); the earlier assistant turns are
//!   canned replies that re-paste the code unchanged, and the generated turn is the last one. Like
//!   RefactorChat, the answer mostly re-types code that is already in the context, which is what makes
//!   drafting pay. No randomness anywhere.
//! - `FILE`: any JSONL file with one `{"conversation": [{"role": ..., "content": ...}, ...]}` object a
//!   line; the prompt is every turn before the last assistant turn (the whole conversation when it has
//!   no assistant turn). A user who has the Hugging Face RefactorChat dataset can export it with
//!
//!   ```sh
//!   python -c "import datasets,json; [print(json.dumps({'conversation': r['conversation']})) for r in datasets.load_dataset('BradMcDanel/refactorchat', split='train')]" > refactorchat.jsonl
//!   amusd bench --dataset refactorchat.jsonl ...
//!   ```
//!
//! Samples whose first prompt plus `--max-new-tokens` does not fit the context are skipped (with a
//! note); `--num-samples N` takes the first N that fit.
//!
//! # Measurement
//!
//! ar and sd run in this process, pinned to the verify device; amusd runs through one [`Workers`] backend whose
//! two workers serve every sample. Each model is loaded once per bench. Strategies run one after the
//! other (ar first: it is the reference for the exactness check), each after an untimed warm-up
//! generation. Every strategy is timed by the same code ([`amusd_spec::Metrics`]): time to first token
//! (prefill included) and decode ms/token after it.
//!
//! # Output
//!
//! `--output FILE` writes a JSON list, one record per generation (one line each):
//! `{sample_index, sample_id, turn, strategy, drafter, dataset, prompt_tokens, finish_reason, metrics}`
//! (`drafter`: `model`, `lookup MIN-MAX` or `model+lookup MIN-MAX` for sd and amusd, empty for ar).
//! `metrics` holds the fields of the paper's released `results/*.json` — `total_time` (s),
//! `tokens_generated`, `time_per_token` (s, `total_time / tokens_generated`), `draft_times` and
//! `verify_times` (s, one per forward), `accepted_tokens` (draft tokens accepted by each verify step)
//! — and ours: `ttft` (s), `decode_ms_per_token` (null when fewer than two tokens were generated),
//! `acceptance_rate`, `proposed`, `accepted`, `proposed_lookup` and `accepted_lookup` (of those, the
//! tokens drafted by prompt lookup), `verify_steps`, `rollbacks`, `tokens_hash` (FNV-1a 64 of
//! the token ids as little-endian u32, hex) and `tokens`.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use amusd_model::chat::Message;
use amusd_model::loader::{load_text, ModelText};
use amusd_shm::{EventKind, EventRecord, Role, TOKEN_CAPACITY};
use amusd_spec::generate::check_fits;
use amusd_spec::{FinishReason, Generation, RequestSampling, SamplingParams, StopCriteria};
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::args::{sampling_label, ModelArgs, SamplingArgs, Strategy};
use crate::backend::{Backend, InProcess, Request, Trace, Workers};
use crate::prompt::{check_same_vocabulary, encode_conversation};
use crate::supervisor::INTERRUPTED;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// humaneval, mt-bench, refactor (a stand-in for RefactorChat), or a JSONL file of
    /// {"conversation": [{"role": ..., "content": ...}, ...]} lines.
    #[arg(long, value_name = "DATASET")]
    pub dataset: String,
    /// Strategies to compare (ar runs first whatever the order: it is the reference).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ar,sd,amusd")]
    pub strategies: Vec<Strategy>,
    /// How many samples (the first N that fit the context). Default: all.
    #[arg(long, value_name = "N")]
    pub num_samples: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Untimed warm-up generations (of at most 16 tokens) per strategy before the timed ones.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Write one record per generation to this JSON file.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Draw an SVG timeline of one sample (its first turn): tokens over time, and every draft and
    /// verify forward of each strategy.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Which sample --plot draws (0-based, among the samples run).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub plot_sample: usize,
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Result files written by `amusd bench --output`.
    #[arg(required = true, value_name = "RESULTS.json")]
    pub results: Vec<PathBuf>,
    /// Print a GitHub markdown table.
    #[arg(long)]
    pub markdown: bool,
}

// ---------------------------------------------------------------------------------------------
// Datasets
// ---------------------------------------------------------------------------------------------

/// Which dataset `--dataset` names.
#[derive(Clone, Debug)]
enum Dataset {
    HumanEval,
    MtBench,
    /// The deterministic RefactorChat stand-in built from HumanEval.
    RefactorStandIn,
    File(PathBuf),
}

/// One sample: a conversation ending with a user turn, then user turns asked after the model's own
/// answer (MT-Bench's second turn).
#[derive(Clone, Debug)]
struct Sample {
    /// Index in the dataset (kept when earlier samples are skipped).
    index: usize,
    /// The dataset's own name for it (task id, question id, line number).
    id: String,
    conversation: Vec<Message>,
    follow_ups: Vec<String>,
}

impl Dataset {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "humaneval" => Self::HumanEval,
            "mt-bench" | "mt_bench" | "mtbench" => Self::MtBench,
            "refactor" | "refactor-standin" => Self::RefactorStandIn,
            _ => {
                let path = PathBuf::from(s);
                if !path.is_file() {
                    bail!(
                        "unknown dataset '{s}': expected humaneval, mt-bench, refactor, or a JSONL file (no file {s})"
                    );
                }
                Self::File(path)
            }
        })
    }

    /// The name recorded in results. The stand-in says so.
    fn name(&self) -> String {
        match self {
            Self::HumanEval => "humaneval".into(),
            Self::MtBench => "mt-bench".into(),
            Self::RefactorStandIn => "refactor-standin".into(),
            Self::File(p) => p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
        }
    }

    fn load(&self) -> Result<Vec<Sample>> {
        match self {
            Self::HumanEval => Ok(humaneval_tasks()?
                .into_iter()
                .enumerate()
                .map(|(index, t)| Sample {
                    index,
                    id: t.task_id,
                    conversation: vec![Message::user(format!(
                        "Complete the following Python function:\n```python\n{}```",
                        t.prompt
                    ))],
                    follow_ups: Vec::new(),
                })
                .collect()),
            Self::MtBench => mt_bench(),
            Self::RefactorStandIn => Ok(refactor_standin(&humaneval_tasks()?)),
            Self::File(path) => conversation_file(path),
        }
    }
}

#[derive(Deserialize)]
struct HumanEvalTask {
    task_id: String,
    prompt: String,
    canonical_solution: String,
}

/// Makes sure a fetched dataset file is there, fetching it on first use.
fn ensure_asset(path: &Path, asset: &str) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    let hint = format!(
        "run scripts/fetch-assets.sh {asset}, or put the file at {} by hand",
        path.display()
    );
    if crate::assets::fetch(&[asset]).is_err() || !path.is_file() {
        bail!(
            "the {asset} dataset is missing at {} and could not be fetched; {hint}",
            path.display()
        );
    }
    Ok(())
}

/// Parses one JSON value per non-blank line. Any unreadable line (bad gzip, bad UTF-8, bad JSON)
/// fails with the line number and `fix`, the way to repair it.
fn read_jsonl<T: DeserializeOwned>(reader: impl BufRead, path: &Path, fix: &str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| {
            anyhow::anyhow!(
                "{} is unreadable at line {} ({e}); {fix}",
                path.display(),
                i + 1
            )
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(&line).map_err(|e| {
            anyhow::anyhow!(
                "{} is malformed at line {} ({e}); {fix}",
                path.display(),
                i + 1
            )
        })?;
        out.push(value);
    }
    if out.is_empty() {
        bail!("{} holds no samples; {fix}", path.display());
    }
    Ok(out)
}

fn dataset_path(rel: &str) -> PathBuf {
    amusd_model::paths::amusd_home().join("datasets").join(rel)
}

/// How to repair a fetched dataset that does not parse.
fn refetch_hint(asset: &str) -> String {
    format!("delete it and run scripts/fetch-assets.sh {asset}")
}

/// Reads a fetched dataset (`rel` under `$AMUSD_HOME/datasets`, gzipped if it ends in `.gz`),
/// fetching it first when it is missing.
fn read_dataset<T: DeserializeOwned>(rel: &str, asset: &str) -> Result<Vec<T>> {
    let path = dataset_path(rel);
    ensure_asset(&path, asset)?;
    let file =
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let fix = refetch_hint(asset);
    if rel.ends_with(".gz") {
        let gz = flate2::read::GzDecoder::new(file);
        read_jsonl(BufReader::new(gz), &path, &fix)
    } else {
        read_jsonl(BufReader::new(file), &path, &fix)
    }
}

fn humaneval_tasks() -> Result<Vec<HumanEvalTask>> {
    read_dataset("HumanEval.jsonl.gz", "humaneval")
}

#[derive(Deserialize)]
struct MtBenchQuestion {
    question_id: serde_json::Value,
    #[serde(default)]
    category: Option<String>,
    turns: Vec<String>,
}

fn mt_bench() -> Result<Vec<Sample>> {
    let rel = "mt_bench/question.jsonl";
    let questions: Vec<MtBenchQuestion> = read_dataset(rel, "mt-bench")?;
    questions
        .into_iter()
        .enumerate()
        .map(|(index, q)| {
            let mut turns = q.turns.into_iter();
            let Some(first) = turns.next() else {
                bail!(
                    "{}: question {} has no turns; {}",
                    dataset_path(rel).display(),
                    q.question_id,
                    refetch_hint("mt-bench")
                );
            };
            let id = match (&q.question_id, q.category) {
                (serde_json::Value::String(s), Some(c)) => format!("{s} ({c})"),
                (v, Some(c)) => format!("{v} ({c})"),
                (serde_json::Value::String(s), None) => s.clone(),
                (v, None) => v.to_string(),
            };
            Ok(Sample {
                index,
                id,
                conversation: vec![Message::user(first)],
                follow_ups: turns.collect(),
            })
        })
        .collect()
}

/// What the stand-in asks for, in rotation.
const REFACTOR_ASKS: [&str; 6] = [
    "Rename the variables to be more descriptive.",
    "Add type hints and a docstring.",
    "Extract a helper function.",
    "Rewrite the loops as comprehensions where that keeps the code readable.",
    "Add input validation that raises ValueError on bad arguments.",
    "Add a short comment before each step explaining what it does.",
];

/// The RefactorChat stand-in: sample `i` pastes HumanEval task `i`'s reference solution and asks for
/// `1 + i % 3` refactorings in turn; earlier assistant turns are canned and re-paste the code.
fn refactor_standin(tasks: &[HumanEvalTask]) -> Vec<Sample> {
    tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let code = format!("{}{}", t.prompt, t.canonical_solution);
            let asks: Vec<&str> = (0..1 + i % 3)
                .map(|k| REFACTOR_ASKS[(i + k) % REFACTOR_ASKS.len()])
                .collect();
            let mut conversation = vec![Message::user(format!(
                "Here is a Python function:\n\n```python\n{code}```\n\n{}",
                asks[0]
            ))];
            for ask in &asks[1..] {
                conversation.push(Message::assistant(format!(
                    "Here is the updated function:\n\n```python\n{code}```"
                )));
                conversation.push(Message::user(*ask));
            }
            Sample {
                index: i,
                id: format!(
                    "{} (stand-in, {} turn{})",
                    t.task_id,
                    asks.len(),
                    if asks.len() > 1 { "s" } else { "" }
                ),
                conversation,
                follow_ups: Vec::new(),
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct ConversationLine {
    conversation: Vec<Message>,
}

fn conversation_file(path: &Path) -> Result<Vec<Sample>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let fix =
        r#"expected one {"conversation": [{"role": ..., "content": ...}, ...]} object a line"#;
    let lines: Vec<ConversationLine> = read_jsonl(BufReader::new(file), path, fix)?;
    lines
        .into_iter()
        .enumerate()
        .map(|(index, l)| {
            let mut conversation = l.conversation;
            if let Some(last) = conversation.iter().rposition(|m| m.role == "assistant") {
                conversation.truncate(last);
            }
            if conversation.is_empty() {
                bail!(
                    "{}: conversation {} has no turn before its last assistant turn; {fix}",
                    path.display(),
                    index + 1
                );
            }
            Ok(Sample {
                index,
                id: format!("line {}", index + 1),
                conversation,
                follow_ups: Vec::new(),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------

/// One generation, as written to `--output` and read by `amusd report`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    sample_index: usize,
    #[serde(default)]
    sample_id: String,
    #[serde(default = "first_turn")]
    turn: usize,
    strategy: String,
    /// How sd and amusd drafted: `model`, `lookup MIN-MAX` or `model+lookup MIN-MAX` (empty for
    /// ar, and in records written before prompt lookup, which drafted with the model).
    #[serde(default)]
    drafter: String,
    dataset: String,
    #[serde(default)]
    prompt_tokens: usize,
    #[serde(default)]
    finish_reason: String,
    /// Records written before sampling existed are greedy.
    #[serde(default)]
    sampling: SamplingRecord,
    metrics: RecordMetrics,
}

/// The sampling parameters of a record.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SamplingRecord {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    seed: u64,
    #[serde(default)]
    greedy_draft: bool,
}

impl Default for SamplingRecord {
    fn default() -> Self {
        Self::of(&RequestSampling::default())
    }
}

impl SamplingRecord {
    fn of(s: &RequestSampling) -> Self {
        let p = &s.params;
        Self {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            seed: p.seed,
            greedy_draft: s.greedy_draft,
        }
    }

    fn sampling(&self) -> RequestSampling {
        RequestSampling {
            params: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                seed: self.seed,
            },
            greedy_draft: self.greedy_draft,
        }
    }
}

impl Record {
    /// What the report groups by: the dataset, and the sampling unless greedy.
    fn group(&self) -> String {
        let sampling = self.sampling.sampling();
        if sampling.params.is_greedy() && !sampling.greedy_draft {
            self.dataset.clone()
        } else {
            format!("{} ({})", self.dataset, sampling_label(&sampling))
        }
    }

    /// The report's row: the strategy, and how it drafted unless with the model alone.
    fn row(&self) -> String {
        match self.drafter.as_str() {
            "" | "model" => self.strategy.clone(),
            d => format!("{} [{d}]", self.strategy),
        }
    }
}

fn first_turn() -> usize {
    1
}

/// The paper's fields first, then ours. Times in seconds except `decode_ms_per_token`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RecordMetrics {
    total_time: f64,
    tokens_generated: usize,
    time_per_token: Option<f64>,
    draft_times: Vec<f64>,
    verify_times: Vec<f64>,
    accepted_tokens: Vec<usize>,
    ttft: f64,
    decode_ms_per_token: Option<f64>,
    acceptance_rate: f64,
    proposed: usize,
    accepted: usize,
    verify_steps: usize,
    rollbacks: usize,
    /// Of `proposed` and `accepted`, the tokens drafted by prompt lookup.
    #[serde(default)]
    proposed_lookup: usize,
    #[serde(default)]
    accepted_lookup: usize,
    tokens_hash: String,
    tokens: Vec<u32>,
}

impl RecordMetrics {
    fn of(g: &Generation) -> Self {
        let m = &g.metrics;
        Self {
            total_time: m.total_time,
            tokens_generated: m.new_tokens,
            time_per_token: (m.new_tokens > 0).then(|| m.total_time / m.new_tokens as f64),
            draft_times: m.draft_times.clone(),
            verify_times: m.verify_times.clone(),
            accepted_tokens: m.accepted_per_step.clone(),
            ttft: m.ttft,
            // With one token there is no decode phase; Metrics would fall back to the total time,
            // which is mostly prefill and would skew a mean of decode rates.
            decode_ms_per_token: (m.new_tokens >= 2).then(|| m.ms_per_token()),
            acceptance_rate: m.acceptance_rate(),
            proposed: m.proposed,
            accepted: m.accepted,
            verify_steps: m.verify_steps,
            rollbacks: m.rollbacks,
            proposed_lookup: m.proposed_lookup,
            accepted_lookup: m.accepted_lookup,
            tokens_hash: tokens_hash(&g.tokens),
            tokens: g.tokens.clone(),
        }
    }
}

/// FNV-1a (64-bit) of the token ids as little-endian u32s, in hex: a short fingerprint to compare
/// outputs by eye or across files.
fn tokens_hash(tokens: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in tokens {
        for b in t.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Writes the records one a line, so result files diff well and stay readable.
fn write_records(path: &Path, records: &[Record]) -> Result<()> {
    let mut out = String::from("[\n");
    for (i, r) in records.iter().enumerate() {
        out.push_str(&serde_json::to_string(r)?);
        out.push_str(if i + 1 < records.len() { ",\n" } else { "\n" });
    }
    out.push_str("]\n");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an `amusd bench --output` file ({e})",
            path.display()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Running the strategies
// ---------------------------------------------------------------------------------------------

/// Undoes the pinning of [`amusd_spec::bind::bind_current_process`] for the amusd coordinator, which
/// `amusd generate` runs unpinned: pinned to the verify core it would steal time from the verify
/// worker's core on every wake-up.
struct SavedAffinity(libc::cpu_set_t);

impl SavedAffinity {
    fn current() -> Option<Self> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
                .then_some(Self(set))
        }
    }

    fn restore(&self) {
        // SAFETY: passes a valid cpu_set_t of the size given. Failure leaves the pinning in place,
        // which costs some speed but no correctness.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0);
        }
    }
}

/// A sample with its first prompt tokenized.
struct Prepared {
    sample: Sample,
    first_prompt: Vec<u32>,
}

/// Everything one strategy produced.
struct Outcome {
    records: Vec<Record>,
    /// The trace of the plotted sample's first turn.
    plot: Option<(Generation, Trace)>,
}

/// What a strategy run needs besides the backend.
struct RunContext<'a> {
    text: &'a ModelText,
    samples: &'a [Prepared],
    stop: StopCriteria,
    sampling: RequestSampling,
    dataset: String,
    /// How sd and amusd draft (recorded with each of their generations).
    drafter: String,
    warmup: usize,
    plot_sample: Option<usize>,
}

impl RunContext<'_> {
    fn encode(&self, conversation: &[Message]) -> Result<Vec<u32>> {
        encode_conversation(
            &self.text.tokenizer,
            self.text.chat_template.as_ref(),
            conversation,
            false,
        )
    }

    /// One request on `backend`, the sampling the bench's.
    fn generate(
        &self,
        backend: &mut Backend,
        prompt: &[u32],
        stop: &StopCriteria,
    ) -> Result<(Generation, Trace)> {
        let request = Request {
            prompt,
            stop,
            sampling: &self.sampling,
        };
        let c = backend.generate(&request, &mut |_| ControlFlow::Continue(()))?;
        Ok((c.generation, c.trace))
    }

    /// Runs every sample (every turn) through `backend`. Stops at the first error (or Ctrl-C),
    /// keeping what was done in `done`.
    fn run_strategy(
        &self,
        backend: &mut Backend,
        pb: &ProgressBar,
        reference: &HashMap<(usize, usize), Vec<u32>>,
        mismatches: &mut Vec<String>,
        done: &mut Outcome,
    ) -> Result<()> {
        let strategy = backend.strategy();
        if let Some(first) = self.samples.first() {
            let warm = StopCriteria {
                stop_ids: self.stop.stop_ids.clone(),
                max_new_tokens: self.stop.max_new_tokens.min(16),
            };
            for _ in 0..self.warmup {
                self.generate(backend, &first.first_prompt, &warm)?;
            }
        }
        for (k, p) in self.samples.iter().enumerate() {
            let s = &p.sample;
            let mut conversation = s.conversation.clone();
            for turn in 1..=s.follow_ups.len() + 1 {
                let prompt = if turn == 1 {
                    p.first_prompt.clone()
                } else {
                    self.encode(&conversation)?
                };
                let (g, trace) =
                    self.generate(backend, &prompt, &self.stop)
                        .with_context(|| {
                            format!(
                                "{} failed on sample {} ({})",
                                strategy.name(),
                                s.index,
                                s.id
                            )
                        })?;
                if INTERRUPTED.load(Ordering::SeqCst) {
                    bail!("interrupted");
                }
                if let Some(want) = reference.get(&(s.index, turn)) {
                    if let Some(m) = mismatch(strategy, s, turn, want, &g.tokens) {
                        pb.suspend(|| eprintln!("amusd: {m}"));
                        mismatches.push(m);
                    }
                }
                if turn <= s.follow_ups.len() {
                    let answer = self.text.tokenizer.decode(&g.tokens, true)?;
                    conversation.push(Message::assistant(answer));
                    conversation.push(Message::user(s.follow_ups[turn - 1].clone()));
                }
                done.records.push(Record {
                    sample_index: s.index,
                    sample_id: s.id.clone(),
                    turn,
                    strategy: strategy.name().into(),
                    drafter: if strategy == Strategy::Ar {
                        String::new()
                    } else {
                        self.drafter.clone()
                    },
                    dataset: self.dataset.clone(),
                    prompt_tokens: prompt.len(),
                    finish_reason: match g.finish {
                        FinishReason::Stop => "stop".into(),
                        FinishReason::Length => "length".into(),
                        FinishReason::Cancelled => "cancelled".into(),
                    },
                    sampling: SamplingRecord::of(&self.sampling),
                    metrics: RecordMetrics::of(&g),
                });
                if turn == 1 && self.plot_sample == Some(k) {
                    done.plot = Some((g, trace));
                }
            }
            pb.inc(1);
        }
        Ok(())
    }
}

/// Describes how `got` differs from the reference `want`, if it does.
fn mismatch(
    strategy: Strategy,
    s: &Sample,
    turn: usize,
    want: &[u32],
    got: &[u32],
) -> Option<String> {
    if want == got {
        return None;
    }
    let at = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    let show = |t: &[u32]| {
        t.get(at)
            .map_or("the end".to_string(), |v| format!("token {v}"))
    };
    Some(format!(
        "{} output differs from ar on sample {} ({}) turn {turn} at position {at}: ar has {}, {} has {} (lengths {} and {})",
        strategy.name(),
        s.index,
        s.id,
        show(want),
        strategy.name(),
        show(got),
        want.len(),
        got.len()
    ))
}

pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let dataset = Dataset::parse(&args.dataset)?;
    let dataset_name = dataset.name();
    let mut strategies: Vec<Strategy> = Vec::new();
    // ar first: it is the reference every other output is checked against as it is produced.
    for s in [Strategy::Ar, Strategy::Sd, Strategy::Amusd] {
        if args.strategies.contains(&s) {
            strategies.push(s);
        }
    }
    if strategies.is_empty() {
        bail!("no strategy: pass --strategies ar,sd,amusd (or a subset)");
    }
    if args.num_samples == Some(0) {
        bail!("--num-samples 0 runs nothing; pass at least 1");
    }
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens 0 generates nothing; pass at least 1");
    }
    let sampling = args.sampling.resolve()?;
    if !sampling.params.is_greedy() {
        eprintln!("amusd: sampling with {}", sampling_label(&sampling));
    }
    let m = &args.models;
    let in_process = strategies.iter().any(|&s| s != Strategy::Amusd);
    let saved_affinity = SavedAffinity::current();
    if in_process {
        // Before any model loads: the compute pools read the thread count once, at start.
        amusd_spec::bind::bind_current_process(m.verify_device()?)?;
    }
    crate::supervisor::install_signal_handlers();

    let verify_spec = m.verify_spec()?;
    let text = load_text(&verify_spec.parse()?).context("cannot load the verify model")?;
    let needs_draft = strategies.iter().any(|&s| s != Strategy::Ar);
    let draft_spec = if needs_draft {
        Some(m.draft_spec()?)
    } else {
        None
    };
    let draft_context = match &draft_spec {
        // Prompt lookup alone: no draft model, no context of its own.
        Some(_) if m.lookup_alone()?.is_some() => None,
        Some(spec) => {
            let draft_text = load_text(&spec.parse()?).context("cannot load the draft model")?;
            check_same_vocabulary(&text.tokenizer, &draft_text.tokenizer)?;
            Some(draft_text.context_length)
        }
        None => None,
    };

    let mut in_proc = if in_process {
        let sd_draft = draft_spec
            .as_deref()
            .filter(|_| strategies.contains(&Strategy::Sd));
        Some(InProcess::load(&verify_spec, sd_draft, m)?)
    } else {
        None
    };

    // Pick the samples that fit the context (and the region's token buffer): every strategy reserves
    // exactly prompt + max_new positions, so one check serves them all.
    // The draft must hold the request too: sd and amusd reserve the same positions in both models.
    let mut capacity = text.context_length.min(draft_context.unwrap_or(usize::MAX));
    if let Some(p) = &in_proc {
        capacity = capacity.min(p.max_position());
    }
    if strategies.contains(&Strategy::Amusd) {
        capacity = capacity.min(TOKEN_CAPACITY);
    }
    let all = dataset.load()?;
    let available = all.len();
    let want = args.num_samples.unwrap_or(available);
    let mut samples = Vec::new();
    for sample in all {
        if samples.len() == want {
            break;
        }
        let first_prompt = encode_conversation(
            &text.tokenizer,
            text.chat_template.as_ref(),
            &sample.conversation,
            false,
        )?;
        if check_fits(capacity, first_prompt.len(), args.max_new_tokens).is_err() {
            eprintln!(
                "amusd: skipping sample {} ({}): {} prompt tokens + {} new tokens do not fit the context of {capacity}",
                sample.index,
                sample.id,
                first_prompt.len(),
                args.max_new_tokens
            );
            continue;
        }
        samples.push(Prepared {
            sample,
            first_prompt,
        });
    }
    if samples.is_empty() {
        bail!(
            "no sample of {dataset_name} fits the context with --max-new-tokens {}",
            args.max_new_tokens
        );
    }
    if samples.len() < want && args.num_samples.is_some() {
        eprintln!(
            "amusd: {dataset_name} has only {} usable samples of {available}; running those",
            samples.len()
        );
    }
    if args.plot.is_some() && args.plot_sample >= samples.len() {
        bail!(
            "--plot-sample {} is out of range: {} samples are run (0..={})",
            args.plot_sample,
            samples.len(),
            samples.len() - 1
        );
    }

    let ctx = RunContext {
        text: &text,
        samples: &samples,
        stop: StopCriteria {
            stop_ids: text.eos_ids.clone(),
            max_new_tokens: args.max_new_tokens,
        },
        sampling,
        dataset: dataset_name.clone(),
        drafter: m.drafter_label(),
        warmup: args.warmup,
        plot_sample: args.plot.as_ref().map(|_| args.plot_sample),
    };
    let pb = ProgressBar::new((samples.len() * strategies.len()) as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>14} [{bar:30}] {pos}/{len} samples, {elapsed_precise} (eta {eta})",
        )?
        .progress_chars("=> "),
    );
    let mut records = Vec::new();
    let mut plots = Vec::new();
    let mut mismatches = Vec::new();
    let mut reference: HashMap<(usize, usize), Vec<u32>> = HashMap::new();
    let mut failure = None;
    for &strategy in &strategies {
        pb.set_message(format!("{dataset_name} {}", strategy.name()));
        let mut done = Outcome {
            records: Vec::new(),
            plot: None,
        };
        let backend = match strategy {
            Strategy::Ar | Strategy::Sd => in_proc
                .take()
                .ok_or_else(|| anyhow::anyhow!("internal: no in-process models"))
                .map(|p| match strategy {
                    Strategy::Ar => Backend::Ar(p),
                    _ => Backend::Sd(p),
                }),
            Strategy::Amusd => {
                // The in-process models are done with; free their memory for the workers.
                in_proc = None;
                if let Some(a) = &saved_affinity {
                    a.restore();
                }
                let draft = draft_spec.as_deref().unwrap_or_default();
                pb.suspend(|| Workers::start(m, &verify_spec, draft))
                    .map(Backend::Amusd)
            }
        };
        let result = backend.and_then(|mut backend| {
            let r = ctx.run_strategy(&mut backend, &pb, &reference, &mut mismatches, &mut done);
            in_proc = backend.into_in_process();
            r
        });
        if strategy == Strategy::Ar {
            for r in &done.records {
                reference.insert((r.sample_index, r.turn), r.metrics.tokens.clone());
            }
        }
        records.extend(done.records);
        if let Some(p) = done.plot {
            plots.push((strategy, p));
        }
        if let Err(e) = result {
            failure = Some(e);
            break;
        }
    }
    pb.finish_and_clear();

    if let Some(path) = &args.output {
        write_records(path, &records)?;
    }
    if let Some(e) = failure {
        let kept = match &args.output {
            Some(p) if !records.is_empty() => {
                format!(
                    " ({} finished generations written to {})",
                    records.len(),
                    p.display()
                )
            }
            _ => String::new(),
        };
        if INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("amusd: interrupted{kept}");
            return Ok(ExitCode::from(130));
        }
        return Err(e.context(format!("bench stopped{kept}")));
    }
    if let Some(path) = &args.plot {
        let k = args.plot_sample;
        let s = &samples[k].sample;
        let title = format!(
            "{dataset_name} sample {} ({}), turn 1, max {} new tokens",
            s.index, s.id, args.max_new_tokens
        );
        let svg = render_svg(
            &title,
            &plots
                .iter()
                .map(|(st, (g, t))| build_plot(*st, g, t))
                .collect::<Vec<_>>(),
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the directory {}", dir.display()))?;
        }
        std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
    }

    print!("{}", render_report(&summarize(&records), false));
    let checked = records
        .iter()
        .filter(|r| r.strategy != "ar" && reference.contains_key(&(r.sample_index, r.turn)))
        .count();
    if !mismatches.is_empty() {
        eprintln!(
            "amusd: exactness FAILED: {} of {checked} outputs differ from ar's (listed above)",
            mismatches.len()
        );
        return Ok(ExitCode::from(1));
    }
    if checked > 0 {
        eprintln!("amusd: exactness: all {checked} sd/amusd outputs equal ar's");
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// One line of the table: a strategy on a dataset.
struct Row {
    dataset: String,
    strategy: String,
    samples: usize,
    generations: usize,
    ttft_ms: f64,
    ms_per_token: Option<f64>,
    speedup_ar: Option<f64>,
    speedup_sd: Option<f64>,
    acceptance: Option<f64>,
    tokens_per_step: Option<f64>,
    rollbacks_per_100: Option<f64>,
    /// Of the accepted draft tokens, the share drafted by prompt lookup (rows that used it).
    from_lookup: Option<f64>,
    /// Generations equal to ar's, of those that have an ar counterpart.
    identical: Option<(usize, usize)>,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// Groups records by dataset (in order of appearance) and strategy (ar, sd, amusd, then others).
fn summarize(records: &[Record]) -> Vec<Row> {
    let mut datasets: Vec<String> = Vec::new();
    for r in records {
        if !datasets.contains(&r.group()) {
            datasets.push(r.group());
        }
    }
    let mut rows = Vec::new();
    for ds in &datasets {
        let of_ds: Vec<&Record> = records.iter().filter(|r| &r.group() == ds).collect();
        // One row per strategy and drafter: ar, sd, amusd (model drafts), then the others.
        let mut strategies: Vec<String> = Vec::new();
        for known in ["ar", "sd", "amusd"] {
            if of_ds.iter().any(|r| r.row() == known) {
                strategies.push(known.into());
            }
        }
        for r in &of_ds {
            if !strategies.contains(&r.row()) {
                strategies.push(r.row());
            }
        }
        let reference: HashMap<(usize, usize), &Vec<u32>> = of_ds
            .iter()
            .filter(|r| r.strategy == "ar")
            .map(|r| ((r.sample_index, r.turn), &r.metrics.tokens))
            .collect();
        let decode_mean = |strategy: &str| {
            mean(
                of_ds
                    .iter()
                    .filter(|r| r.row() == strategy)
                    .filter_map(|r| r.metrics.decode_ms_per_token),
            )
        };
        let (ar_ms, sd_ms) = (decode_mean("ar"), decode_mean("sd"));
        for st in strategies {
            let gens: Vec<&&Record> = of_ds.iter().filter(|r| r.row() == st).collect();
            let sum =
                |f: fn(&RecordMetrics) -> usize| gens.iter().map(|r| f(&r.metrics)).sum::<usize>();
            let tokens = sum(|m| m.tokens_generated);
            let ms = decode_mean(&st);
            let speedup = |base: Option<f64>| match (base, ms) {
                (Some(b), Some(v)) if v > 0.0 => Some(b / v),
                _ => None,
            };
            let compared: Vec<bool> = gens
                .iter()
                .filter_map(|r| {
                    reference
                        .get(&(r.sample_index, r.turn))
                        .map(|want| **want == r.metrics.tokens)
                })
                .collect();
            let drafts = st != "ar";
            rows.push(Row {
                dataset: ds.to_string(),
                strategy: st.clone(),
                samples: gens
                    .iter()
                    .map(|r| r.sample_index)
                    .collect::<BTreeSet<_>>()
                    .len(),
                generations: gens.len(),
                ttft_ms: mean(gens.iter().map(|r| r.metrics.ttft * 1e3)).unwrap_or(0.0),
                ms_per_token: ms,
                speedup_ar: speedup(ar_ms),
                speedup_sd: speedup(sd_ms),
                acceptance: drafts
                    .then(|| ratio(sum(|m| m.accepted), sum(|m| m.proposed)))
                    .flatten(),
                tokens_per_step: ratio(tokens, sum(|m| m.verify_steps)),
                rollbacks_per_100: drafts
                    .then(|| ratio(100 * sum(|m| m.rollbacks), tokens))
                    .flatten(),
                from_lookup: (sum(|m| m.proposed_lookup) > 0)
                    .then(|| ratio(sum(|m| m.accepted_lookup), sum(|m| m.accepted)))
                    .flatten(),
                identical: (drafts && !compared.is_empty()).then(|| {
                    (
                        compared.iter().filter(|&&same| same).count(),
                        compared.len(),
                    )
                }),
            });
        }
    }
    rows
}

/// What the columns mean; printed under every table.
const FOOTNOTE: &str = "ms/token: decode time after the first token / (tokens - 1), arithmetic mean over generations \
(an mt-bench turn is one generation); speedup = mean ms/token of ar (of sd) / this strategy's mean ms/token. \
ttft includes prefill. accept = accepted / proposed draft tokens and tokens/step = tokens / verify forwards, \
both pooled over generations; from lookup = accepted tokens drafted by prompt lookup / all accepted \
draft tokens; [lookup MIN-MAX]: prompt lookup drafts alone, [model+lookup MIN-MAX]: ahead of the draft \
model; identical = generations token-for-token equal to ar's.";

fn render_report(rows: &[Row], markdown: bool) -> String {
    let header = [
        "dataset",
        "strategy",
        "samples",
        "ttft ms",
        "ms/token",
        "speedup vs ar",
        "speedup vs sd",
        "accept",
        "tokens/step",
        "rollbacks/100 tok",
        "from lookup",
        "identical",
    ];
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("—".to_string(), f);
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.dataset.clone(),
                r.strategy.clone(),
                if r.generations == r.samples {
                    r.samples.to_string()
                } else {
                    format!("{} ({} gens)", r.samples, r.generations)
                },
                format!("{:.0}", r.ttft_ms),
                opt(r.ms_per_token, &|v| format!("{v:.1}")),
                opt(r.speedup_ar, &|v| format!("{v:.2}×")),
                opt(r.speedup_sd, &|v| format!("{v:.2}×")),
                opt(r.acceptance, &|v| format!("{:.1}%", 100.0 * v)),
                opt(r.tokens_per_step, &|v| format!("{v:.2}")),
                opt(r.rollbacks_per_100, &|v| format!("{v:.1}")),
                opt(r.from_lookup, &|v| format!("{:.1}%", 100.0 * v)),
                r.identical
                    .map_or("—".to_string(), |(n, of)| format!("{n}/{of}")),
            ]
        })
        .collect();
    let mut out = String::new();
    if markdown {
        let _ = writeln!(out, "| {} |", header.join(" | "));
        let align: Vec<&str> = (0..header.len())
            .map(|i| if i < 2 { "---" } else { "---:" })
            .collect();
        let _ = writeln!(out, "|{}|", align.join("|"));
        for row in &body {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        let _ = writeln!(out, "\n{FOOTNOTE}");
        return out;
    }
    let width = |i: usize| {
        body.iter()
            .map(|r| r[i].chars().count())
            .chain([header[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i] - c.chars().count();
            if i < 2 {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
            s.push_str("  ");
        }
        s.trim_end().to_string()
    };
    let head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let _ = writeln!(out, "{}", line(&head));
    let mut last_dataset = None;
    for (row, r) in body.iter().zip(rows) {
        if last_dataset.is_some_and(|d| d != r.dataset.as_str()) {
            out.push('\n');
        }
        last_dataset = Some(r.dataset.as_str());
        let _ = writeln!(out, "{}", line(row));
    }
    let _ = writeln!(out, "\n{FOOTNOTE}");
    out
}

pub fn report(args: ReportArgs) -> Result<ExitCode> {
    let mut records = Vec::new();
    for path in &args.results {
        records.extend(read_records(path)?);
    }
    if records.is_empty() {
        bail!(
            "no records in {}",
            args.results
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut out = std::io::stdout().lock();
    out.write_all(render_report(&summarize(&records), args.markdown).as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// Timeline plot
// ---------------------------------------------------------------------------------------------

const COLOR_AR_LINE: &str = "#4682B4";
const COLOR_SD_LINE: &str = "#32CD32";
const COLOR_AMUSD_LINE: &str = "#FF8C00";
const COLOR_PREFILL: &str = "#7f7f7f";
const COLOR_AR_STEP: &str = "#4682B4";
const COLOR_ALL_ACCEPTED: &str = "#2ca02c";
const COLOR_SOME_REJECTED: &str = "#ff7f0e";
const COLOR_DRAFT_MATCHED: &str = "#2ca02c";
const COLOR_DRAFT_REJECTED: &str = "#d62728";
const COLOR_DRAFT_UNUSED: &str = "#c7c7c7";

/// A forward pass (or a worker event) on a lane, in ms since the request started.
struct Mark {
    t0: f64,
    t1: f64,
    color: &'static str,
    title: String,
}

struct Lane {
    label: String,
    marks: Vec<Mark>,
    /// Instants drawn as red ticks (amusd draft rollbacks).
    ticks: Vec<(f64, String)>,
}

/// One strategy's part of the timeline.
struct Plot {
    strategy: Strategy,
    /// (ms, tokens committed so far).
    committed: Vec<(f64, usize)>,
    total_ms: f64,
    lanes: Vec<Lane>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

fn build_plot(strategy: Strategy, g: &Generation, trace: &Trace) -> Plot {
    let mut committed = Vec::new();
    let mut n = 0;
    for &(t, k) in &trace.commits {
        n += k;
        committed.push((ms(t), n));
    }
    let lanes = match strategy {
        Strategy::Ar => vec![Lane {
            label: "ar: verify model".into(),
            marks: trace
                .verify
                .iter()
                .enumerate()
                .map(|(i, s)| Mark {
                    t0: ms(s.t0),
                    t1: ms(s.t1),
                    color: if i == 0 { COLOR_PREFILL } else { COLOR_AR_STEP },
                    title: format!(
                        "{} {i}: {} tokens in, {:.1} ms",
                        if i == 0 { "prefill + step" } else { "step" },
                        s.n_in,
                        ms(s.t1 - s.t0)
                    ),
                })
                .collect(),
            ticks: Vec::new(),
        }],
        Strategy::Sd => sd_lanes(g, trace),
        Strategy::Amusd => amusd_lanes(g, trace),
    };
    let end = lanes
        .iter()
        .flat_map(|l| l.marks.iter().map(|m| m.t1))
        .chain(committed.last().map(|c| c.0))
        .fold(g.metrics.total_time * 1e3, f64::max);
    Plot {
        strategy,
        committed,
        total_ms: end,
        lanes,
    }
}

/// sd: the drafts between two verify forwards are that step's proposals; the first
/// `accepted_per_step[k]` of them were accepted.
fn sd_lanes(g: &Generation, trace: &Trace) -> Vec<Lane> {
    let mut draft = Vec::new();
    let mut verify = Vec::new();
    let mut d = 0;
    for (k, v) in trace.verify.iter().enumerate() {
        let first = d;
        while d < trace.draft.len() && trace.draft[d].t1 <= v.t0 {
            d += 1;
        }
        let proposed = d - first;
        let accepted = g.metrics.accepted_per_step.get(k).copied().unwrap_or(0);
        for (j, s) in trace.draft[first..d].iter().enumerate() {
            let ok = j < accepted;
            draft.push(Mark {
                t0: ms(s.t0),
                t1: ms(s.t1),
                color: if ok {
                    COLOR_DRAFT_MATCHED
                } else {
                    COLOR_DRAFT_REJECTED
                },
                title: format!(
                    "draft {j} of step {k}: {}, {} tokens in, {:.1} ms",
                    if ok { "accepted" } else { "rejected" },
                    s.n_in,
                    ms(s.t1 - s.t0)
                ),
            });
        }
        verify.push(Mark {
            t0: ms(v.t0),
            t1: ms(v.t1),
            color: if k == 0 {
                COLOR_PREFILL
            } else if proposed == 0 {
                COLOR_AR_STEP
            } else if accepted == proposed {
                COLOR_ALL_ACCEPTED
            } else {
                COLOR_SOME_REJECTED
            },
            title: format!(
                "verify step {k}{}: {accepted}/{proposed} accepted, {} tokens in, {:.1} ms",
                if k == 0 { " (with prefill)" } else { "" },
                v.n_in,
                ms(v.t1 - v.t0)
            ),
        });
    }
    vec![
        Lane {
            label: "sd: draft model".into(),
            marks: draft,
            ticks: Vec::new(),
        },
        Lane {
            label: "sd: verify model".into(),
            marks: verify,
            ticks: Vec::new(),
        },
    ]
}

/// amusd: a drafted token is rejected when a later rollback discards its position, matched when it
/// survives within the committed tokens, unused when it lies past the end.
fn amusd_lanes(g: &Generation, trace: &Trace) -> Vec<Lane> {
    let end =
        g.metrics.prompt_tokens + g.tokens.len() + usize::from(g.finish == FinishReason::Stop);
    // (event, position, rejected)
    let mut drafted: Vec<(&EventRecord, usize, bool)> = Vec::new();
    let mut ticks = Vec::new();
    let mut verify = Vec::new();
    let mut first_verify = true;
    for (role, e) in &trace.events {
        match (role, e.kind) {
            (Role::Draft, EventKind::DraftToken) => drafted.push((e, e.position as usize, false)),
            (Role::Draft, EventKind::Rollback) => {
                let from = e.position as usize;
                for d in drafted.iter_mut().filter(|d| d.1 >= from) {
                    d.2 = true;
                }
                ticks.push((
                    ms(e.t_start_us),
                    format!(
                        "rollback to position {from}, {} drafted tokens discarded",
                        e.count
                    ),
                ));
            }
            (Role::Verify, EventKind::VerifyStep | EventKind::ArStep) => {
                let (p, a) = (e.count, e.accepted);
                verify.push(Mark {
                    t0: ms(e.t_start_us),
                    t1: ms(e.t_end_us),
                    color: if first_verify {
                        COLOR_PREFILL
                    } else if p == 0 {
                        COLOR_AR_STEP
                    } else if a == p {
                        COLOR_ALL_ACCEPTED
                    } else {
                        COLOR_SOME_REJECTED
                    },
                    title: format!(
                        "{} at position {}{}: {a}/{p} accepted, {:.1} ms",
                        if p == 0 {
                            "autoregressive step"
                        } else {
                            "verify step"
                        },
                        e.position,
                        if first_verify { " (with prefill)" } else { "" },
                        ms(e.t_end_us.saturating_sub(e.t_start_us))
                    ),
                });
                first_verify = false;
            }
            _ => {}
        }
    }
    // A rolled-back position may be drafted again: only the rollbacks after a draft count for it,
    // which the in-order pass above already ensures (a later draft event starts un-rejected).
    let draft = drafted
        .iter()
        .map(|&(e, pos, rejected)| {
            let (color, what) = if rejected {
                (COLOR_DRAFT_REJECTED, "rolled back")
            } else if pos < end {
                (COLOR_DRAFT_MATCHED, "matched the committed token")
            } else {
                (COLOR_DRAFT_UNUSED, "past the end")
            };
            Mark {
                t0: ms(e.t_start_us),
                t1: ms(e.t_end_us),
                color,
                title: format!(
                    "draft at position {pos}: {what}, {:.1} ms",
                    ms(e.t_end_us.saturating_sub(e.t_start_us))
                ),
            }
        })
        .collect();
    let mut lanes = vec![
        Lane {
            label: "amusd: draft worker".into(),
            marks: draft,
            ticks,
        },
        Lane {
            label: "amusd: verify worker".into(),
            marks: verify,
            ticks: Vec::new(),
        },
    ];
    if trace.lost_events > 0 {
        lanes[0]
            .label
            .push_str(&format!(" ({} events lost)", trace.lost_events));
    }
    lanes
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round tick step (1, 2 or 5 times a power of ten) giving about `n` ticks over `span`.
fn tick_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(1e-9);
    let pow = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * pow)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * pow)
}

/// The timeline figure: committed tokens over time (as in the paper's token-generation comparison),
/// and below it one lane per model of each strategy with every forward pass, sharing the time axis.
fn render_svg(title: &str, plots: &[Plot]) -> String {
    const W: f64 = 1100.0;
    const LEFT: f64 = 170.0;
    const RIGHT: f64 = 150.0;
    const A_TOP: f64 = 60.0;
    const A_H: f64 = 200.0;
    const LANE_H: f64 = 18.0;
    const LANE_GAP: f64 = 10.0;
    let pw = W - LEFT - RIGHT;
    let t_max = plots.iter().map(|p| p.total_ms).fold(1.0, f64::max);
    let n_max = plots
        .iter()
        .filter_map(|p| p.committed.last().map(|c| c.1))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |t: f64| LEFT + t.clamp(0.0, t_max) / t_max * pw;
    let y = |n: f64| A_TOP + A_H - n / n_max * A_H;
    let n_lanes: usize = plots.iter().map(|p| p.lanes.len()).sum();
    let lanes_top = A_TOP + A_H + 50.0;
    let lanes_bottom = lanes_top + n_lanes as f64 * (LANE_H + LANE_GAP);
    let height = lanes_bottom + 90.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="15" font-weight="bold" text-anchor="middle">Token generation timeline: {}</text>"#,
        W / 2.0,
        xml_escape(title)
    );

    // Time grid and axis, shared by both panels.
    let step = tick_step(t_max, 8.0);
    let (unit, div) = if t_max >= 2000.0 {
        ("s", 1000.0)
    } else {
        ("ms", 1.0)
    };
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let xt = x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{xt:.1}" y1="{A_TOP}" x2="{xt:.1}" y2="{lanes_bottom:.1}" stroke="#e0e0e0" stroke-dasharray="3,3"/>"##
        );
        let label = if div > 1.0 {
            format!("{}", t / div)
        } else {
            format!("{t}")
        };
        let _ = writeln!(
            s,
            r#"<text x="{xt:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            lanes_bottom + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since the request started ({unit})</text>"#,
        LEFT + pw / 2.0,
        lanes_bottom + 34.0
    );

    // Panel A: committed tokens over time.
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{A_TOP}" width="{pw}" height="{A_H}" fill="none" stroke="black"/>"#
    );
    let y_step = tick_step(n_max, 5.0).max(1.0);
    let mut n = 0.0;
    while n <= n_max + 1e-9 {
        let yn = y(n);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{n}</text>"#,
            LEFT - 6.0,
            yn + 4.0
        );
        n += y_step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">tokens committed</text>"#,
        LEFT - 45.0,
        A_TOP + A_H / 2.0,
        LEFT - 45.0,
        A_TOP + A_H / 2.0
    );
    // A legend in the panel's top-left corner rather than labels at the line ends: the lines end at
    // the same height whenever the outputs are identical, and their labels would overlap.
    for (i, p) in plots.iter().enumerate() {
        let color = match p.strategy {
            Strategy::Ar => COLOR_AR_LINE,
            Strategy::Sd => COLOR_SD_LINE,
            Strategy::Amusd => COLOR_AMUSD_LINE,
        };
        let mut d = format!("M{:.1},{:.1}", x(0.0), y(0.0));
        let mut last = 0;
        for &(t, n) in &p.committed {
            let _ = write!(d, " H{:.1} V{:.1}", x(t), y(n as f64));
            last = n;
        }
        let _ = writeln!(
            s,
            r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="2"/>"#
        );
        let end_t = p.committed.last().map_or(0.0, |c| c.0);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{color}" font-weight="bold">{} ({last} tokens, {:.2} s)</text>"#,
            LEFT + 10.0,
            A_TOP + 18.0 + 16.0 * i as f64,
            p.strategy.name(),
            end_t / 1e3
        );
    }

    // Panel B: one lane per model.
    let mut lane_y = lanes_top;
    for p in plots {
        for lane in &p.lanes {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT - 8.0,
                lane_y + LANE_H / 2.0 + 4.0,
                xml_escape(&lane.label)
            );
            let _ = writeln!(
                s,
                r##"<rect x="{LEFT}" y="{lane_y:.1}" width="{pw}" height="{LANE_H}" fill="#f7f7f7" stroke="#cccccc"/>"##
            );
            for m in &lane.marks {
                let x0 = x(m.t0);
                // Keep every forward visible, however short, with a hairline gap to its neighbour.
                let w = (x(m.t1) - x0 - 0.3).max(0.8);
                let _ = writeln!(
                    s,
                    r#"<rect x="{x0:.2}" y="{:.1}" width="{w:.2}" height="{:.1}" fill="{}"><title>{}</title></rect>"#,
                    lane_y + 2.0,
                    LANE_H - 4.0,
                    m.color,
                    xml_escape(&m.title)
                );
            }
            for (t, what) in &lane.ticks {
                let xt = x(*t);
                let _ = writeln!(
                    s,
                    r##"<line x1="{xt:.2}" y1="{:.1}" x2="{xt:.2}" y2="{:.1}" stroke="{COLOR_DRAFT_REJECTED}" stroke-width="1.5"><title>{}</title></line>"##,
                    lane_y - 3.0,
                    lane_y + LANE_H + 3.0,
                    xml_escape(what)
                );
            }
            lane_y += LANE_H + LANE_GAP;
        }
    }

    // Legend.
    let legend = [
        (COLOR_PREFILL, "first forward (with prefill)"),
        (COLOR_AR_STEP, "autoregressive step"),
        (COLOR_ALL_ACCEPTED, "verify: all accepted / draft: accepted"),
        (COLOR_SOME_REJECTED, "verify: some rejected"),
        (COLOR_DRAFT_REJECTED, "draft: rejected (tick: rollback)"),
        (COLOR_DRAFT_UNUSED, "draft: past the end"),
    ];
    let ly = lanes_bottom + 58.0;
    let mut lx = 20.0;
    for (color, label) in legend {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{color}"/><text x="{:.1}" y="{ly:.1}">{label}</text>"#,
            ly - 10.0,
            lx + 16.0
        );
        lx += 16.0 + 6.5 * label.len() as f64 + 14.0;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_of_known_input() {
        // FNV-1a 64 of the empty input is the offset basis.
        assert_eq!(tokens_hash(&[]), "cbf29ce484222325");
        assert_ne!(tokens_hash(&[1, 2]), tokens_hash(&[2, 1]));
    }

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(tick_step(1000.0, 8.0), 200.0);
        assert_eq!(tick_step(3500.0, 8.0), 500.0);
        assert_eq!(tick_step(10.0, 5.0), 2.0);
    }

    #[test]
    fn refactor_standin_is_deterministic_and_ends_with_a_user_turn() {
        let tasks: Vec<HumanEvalTask> = (0..5)
            .map(|i| HumanEvalTask {
                task_id: format!("HumanEval/{i}"),
                prompt: format!("def f{i}(x):\n"),
                canonical_solution: "    return x\n".into(),
            })
            .collect();
        let a = refactor_standin(&tasks);
        let b = refactor_standin(&tasks);
        for (s, t) in a.iter().zip(&b) {
            assert_eq!(s.conversation, t.conversation);
            assert_eq!(s.conversation.last().map(|m| m.role.as_str()), Some("user"));
            assert!(s.conversation[0].content.contains("    return x"));
        }
        assert_eq!(a[0].conversation.len(), 1);
        assert_eq!(a[2].conversation.len(), 5);
    }

    fn record(strategy: &str, sample: usize, ms: f64, tokens: Vec<u32>) -> Record {
        Record {
            sample_index: sample,
            sample_id: String::new(),
            turn: 1,
            strategy: strategy.into(),
            drafter: String::new(),
            dataset: "d".into(),
            prompt_tokens: 10,
            finish_reason: "length".into(),
            sampling: SamplingRecord::default(),
            metrics: RecordMetrics {
                total_time: 1.0,
                tokens_generated: tokens.len(),
                time_per_token: Some(0.1),
                draft_times: vec![],
                verify_times: vec![],
                accepted_tokens: vec![],
                ttft: 0.1,
                decode_ms_per_token: Some(ms),
                acceptance_rate: 0.5,
                proposed: 4,
                accepted: 2,
                verify_steps: 2,
                rollbacks: 1,
                proposed_lookup: 0,
                accepted_lookup: 0,
                tokens_hash: tokens_hash(&tokens),
                tokens,
            },
        }
    }

    /// Each drafter gets its own row beside the model-drafted ones, with its share of accepted
    /// tokens from the lookup; records from before the drafter field count as model drafts.
    #[test]
    fn report_has_a_row_per_drafter_with_the_lookup_share() {
        let mut lookup = record("amusd", 0, 5.0, vec![1, 2, 3, 4]);
        lookup.drafter = "lookup 2-4".into();
        (
            lookup.metrics.proposed_lookup,
            lookup.metrics.accepted_lookup,
        ) = (4, 2);
        let mut model = record("amusd", 0, 10.0, vec![1, 2, 3, 4]);
        model.drafter = "model".into();
        let rows = summarize(&[
            record("ar", 0, 40.0, vec![1, 2, 3, 4]),
            model,
            lookup,
            record("amusd", 1, 10.0, vec![5]),
        ]);
        let names: Vec<&str> = rows.iter().map(|r| r.strategy.as_str()).collect();
        assert_eq!(names, ["ar", "amusd", "amusd [lookup 2-4]"]);
        assert_eq!(rows[1].generations, 2, "an old record is a model draft");
        assert_eq!(rows[2].speedup_ar, Some(8.0));
        assert_eq!(rows[2].from_lookup, Some(1.0));
        assert_eq!(rows[1].from_lookup, None);
        let md = render_report(&rows, true);
        assert!(md.contains("| d | amusd [lookup 2-4] |"), "{md}");
        assert!(md.contains("| 100.0% |"), "{md}");
    }

    #[test]
    fn report_computes_speedups_and_identity() {
        let rows = summarize(&[
            record("ar", 0, 40.0, vec![1, 2, 3, 4]),
            record("sd", 0, 20.0, vec![1, 2, 3, 4]),
            record("amusd", 0, 10.0, vec![1, 2, 9, 4]),
        ]);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].speedup_ar, Some(2.0));
        assert_eq!(rows[2].speedup_sd, Some(2.0));
        assert_eq!(rows[1].identical, Some((1, 1)));
        assert_eq!(rows[2].identical, Some((0, 1)));
        assert_eq!(rows[0].acceptance, None);
        let md = render_report(&rows, true);
        assert!(md.contains("| d | amusd |"));
    }

    #[test]
    fn mismatch_names_the_first_difference() {
        let s = Sample {
            index: 3,
            id: "x".into(),
            conversation: vec![],
            follow_ups: vec![],
        };
        assert!(mismatch(Strategy::Sd, &s, 1, &[1, 2], &[1, 2]).is_none());
        let m = mismatch(Strategy::Sd, &s, 1, &[1, 2, 3], &[1, 5]).unwrap_or_default();
        assert!(m.contains("position 1"), "{m}");
        let m = mismatch(Strategy::Sd, &s, 1, &[1, 2], &[1, 2, 3]).unwrap_or_default();
        assert!(m.contains("position 2") && m.contains("the end"), "{m}");
    }
}
