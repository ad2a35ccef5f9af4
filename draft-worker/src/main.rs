//! `amusd-draft-worker`: the AMUSD draft process. Started by the coordinator (`amusd generate
//! --strategy amusd`), one per device; it attaches to the coordinator's shared-memory region, loads
//! its model once and serves requests until told to stop.

use std::process::ExitCode;
use std::time::Duration;

use amusd_shm::Role;
use amusd_spec::lookup::NgramRange;
use amusd_spec::process::{worker_exit, worker_main, WorkerConfig};
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
    /// Model: PATH[:FORMAT] or fake:...
    #[arg(long)]
    model: String,
    /// cpu, cpu:N (pinned, single-threaded) or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Draft: most tokens drafted beyond the committed length.
    #[arg(long, default_value_t = 8)]
    max_lookahead: usize,
    /// Verify: most draft tokens checked per forward pass.
    #[arg(long, default_value_t = 16)]
    max_verify_batch: usize,
    /// Verify: microseconds to wait for a draft token before stepping alone.
    #[arg(long, default_value_t = 0)]
    verify_wait_us: u64,
    /// Draft: prompt lookup ahead of the model, with suffixes of MIN to MAX tokens (a model
    /// `lookup[:MIN-MAX]` drafts with the lookup alone instead).
    #[arg(long, value_name = "MIN-MAX")]
    lookup: Option<NgramRange>,
    /// Draft: the longest lookup run proposed at once.
    #[arg(long, default_value_t = NgramRange::MAX_RUN)]
    lookup_max_run: usize,
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
        role: Role::Draft,
        max_lookahead: a.max_lookahead,
        max_verify_batch: a.max_verify_batch,
        wait_for_draft: Duration::from_micros(a.verify_wait_us),
        lookup: a.lookup,
        lookup_max_run: a.lookup_max_run,
        supervised: a.supervised,
    };
    worker_exit("amusd-draft-worker", a.supervised, worker_main(&cfg))
}
