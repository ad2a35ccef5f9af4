//! `amusd-draft-worker`: the AMUSD draft process. Started by the coordinator (`amusd generate
//! --strategy amusd`), one per device; it attaches to the coordinator's shared-memory region, loads
//! its model once and serves requests until told to stop.

use std::process::ExitCode;

use amusd_proc::NgramRange;
use amusd_proc::{worker_exit, worker_main, DraftOptions, RoleOptions, WorkerConfig};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "amusd-draft-worker",
    version,
    about = "The AMUSD draft worker (started by `amusd`)"
)]
struct Args {
    /// Shared-memory region created by the coordinator, e.g. /amusd-1234-0123456789abcdef.
    #[arg(long)]
    region: String,
    #[arg(long, help = "Model: PATH[:FORMAT] or fake:...")]
    model: String,
    /// cpu, cpu:N (pinned, single-threaded) or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Most tokens drafted beyond the committed length.
    #[arg(long, default_value_t = amusd_proc::DEFAULT_MAX_LOOKAHEAD)]
    max_lookahead: usize,
    /// Prompt lookup ahead of the model, with suffixes of MIN to MAX tokens (a model
    /// `lookup[:MIN-MAX]` drafts with the lookup alone instead).
    #[arg(long, value_name = "MIN-MAX")]
    lookup: Option<NgramRange>,
    /// The longest lookup run proposed at once.
    #[arg(long, default_value_t = NgramRange::MAX_RUN)]
    lookup_max_run: usize,
    /// With --lookup: where the lookup finds no match, guesses from the n-gram history of every
    /// request this worker has served.
    #[arg(long, requires = "lookup")]
    history: bool,
    /// Also load the verify model SPEC and compute the first part of each prompt's prefill for
    /// a verify worker started with `--split-prefill` on it (the draft then adopts the verify
    /// model's keys and values instead of prefilling).
    #[arg(long, value_name = "SPEC")]
    split_prefill_with: Option<String>,
    /// Started by the coordinator, which reports this worker's errors from the region.
    #[arg(long, hide = true)]
    supervised: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let cfg = WorkerConfig {
        region: a.region,
        model: a.model,
        device: a.device,
        supervised: a.supervised,
        role: RoleOptions::Draft(DraftOptions {
            max_lookahead: a.max_lookahead,
            lookup: a.lookup,
            lookup_max_run: a.lookup_max_run,
            history: a.history,
            split_with: a.split_prefill_with,
        }),
    };
    worker_exit("amusd-draft-worker", a.supervised, worker_main(&cfg))
}
