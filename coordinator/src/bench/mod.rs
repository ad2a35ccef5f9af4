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
//! ar and sd run in this process, pinned to the verify device; amusd runs through one `Workers` backend whose
//! two workers serve every sample. Each model is loaded once per bench. After an untimed warm-up
//! generation of each strategy, every sample goes through every strategy in turn (ar first: it is
//! the reference for the exactness check), so a machine whose speed drifts during the run (a shared
//! VM does, by 15% and more over minutes) slows all strategies alike and the ratios between them
//! stay fair. Every strategy is timed by the same code ([`amusd_spec::Metrics`]): time to first token
//! (prefill included) and decode ms/token after it. `--compare-lookup` compares two drafters the
//! same way: sd and amusd run each sample once with prompt lookup ahead of the draft model and
//! once with the model alone (the request turns the lookup off: `RequestSampling::no_draft_lookup`,
//! carried to the draft worker in the region), on the same models and workers.
//!
//! # Output
//!
//! `--output FILE` writes a JSON list, one record per generation (one line each):
//! `{sample_index, sample_id, turn, strategy, dataset, prompt_tokens, finish_reason, metrics}`.
//! `metrics` holds the fields of the paper's released `results/*.json` — `total_time` (s),
//! `tokens_generated`, `time_per_token` (s, `total_time / tokens_generated`), `draft_times` and
//! `verify_times` (s, one per forward), `accepted_tokens` (draft tokens accepted by each verify step)
//! — and ours: `ttft` (s), `decode_ms_per_token` (decode time after the first commit over
//! `decode_tokens`, the tokens committed after it; null when nothing was), `decode_tokens`,
//! `acceptance_rate`, `proposed`, `accepted`, `verify_steps`, `rollbacks`, `tokens_hash` (FNV-1a 64 of
//! the token ids as little-endian u32, hex) and `tokens`.

mod datasets;
mod records;
mod report;
mod runner;
mod timeline;
mod trace_lines;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use crate::args::{ModelArgs, SamplingArgs, Strategy};

pub use report::report;

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
    /// sd and amusd run each sample a second time with the draft model alone (the request turns
    /// the lookup off, on the same models and workers), beside the run with prompt lookup ahead
    /// of it: the two drafters compared under the same drift of the machine. Their records say
    /// `drafter: "model"`. Needs a draft model with the lookup (the default).
    #[arg(long)]
    pub compare_lookup: bool,
    /// A conversation's later turns prefill their whole prompt, as its first turn does, instead of
    /// keeping the positions the previous turn left cached (each strategy's own; the tokens are
    /// the same either way)
    #[arg(long)]
    pub no_prompt_cache: bool,
    /// Draw an SVG timeline of one sample (its first turn): tokens over time, and every draft and
    /// verify forward of each strategy.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Which sample --plot draws (0-based, among the samples run).
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub plot_sample: usize,
    /// Write every generation's forward passes and worker events to this file, one JSON line per
    /// generation (times in µs since its request started): what --plot draws, for every sample.
    #[arg(long, value_name = "FILE.jsonl")]
    pub trace: Option<PathBuf>,
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

/// `amusd bench`: load, pick the samples, run every strategy over them, write and print the results.
pub fn run(args: BenchArgs) -> Result<ExitCode> {
    let mut plan = runner::Plan::new(&args)?;
    let models = runner::Models::load(&args.models, &plan.strategies)?;
    let dry = &mut plan.sampling.params.dry;
    if !dry.is_off() {
        let breakers = models
            .text
            .tokenizer
            .tokens_containing(&args.sampling.dry.breakers());
        dry.breakers = amusd_spec::Dry::breaker_bits(breakers);
    }
    let samples = runner::select_samples(&args, &plan, &models)?;
    let run = runner::run_all(&args, &plan, models, &samples)?;
    runner::conclude(&args, &plan, &samples, run)
}
