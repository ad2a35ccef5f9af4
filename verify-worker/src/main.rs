//! `amusd-verify-worker`: the AMUSD verify process. Started by the coordinator (`amusd generate
//! --strategy amusd`), one per device; it attaches to the coordinator's shared-memory region, loads
//! its model once and serves requests until told to stop.

use std::process::ExitCode;
use std::time::Duration;

use amusd_proc::{worker_exit, worker_main, RoleOptions, VerifyOptions, WorkerConfig};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "amusd-verify-worker",
    version,
    about = "The AMUSD verify worker (started by `amusd`)"
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
    /// Most draft tokens checked per forward pass.
    #[arg(long, default_value_t = amusd_proc::DEFAULT_MAX_VERIFY_BATCH)]
    max_verify_batch: usize,
    /// Microseconds to wait for a draft token before stepping alone.
    #[arg(long, default_value_t = 0)]
    verify_wait_us: u64,
    /// Prefill prompts together with the draft worker started with
    /// `--split-prefill-with` this worker's model, where it asks for jobs.
    #[arg(long)]
    split_prefill: bool,
    /// Started by the coordinator, which reports this worker's errors from the region.
    #[arg(long, hide = true)]
    supervised: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let split = match a.split_prefill {
        true => amusd_proc::split_fingerprint(&a.model),
        false => None,
    };
    let cfg = WorkerConfig {
        region: a.region,
        model: a.model,
        device: a.device,
        supervised: a.supervised,
        role: RoleOptions::Verify(VerifyOptions {
            max_verify_batch: a.max_verify_batch,
            wait_for_draft: Duration::from_micros(a.verify_wait_us),
            split,
        }),
    };
    worker_exit("amusd-verify-worker", a.supervised, worker_main(&cfg))
}
