//! `amusd bench --trace`: every generation's forwards and worker events as one JSON line, the data
//! `--plot` draws for one sample, kept for all of them so where the time went can be read back
//! (which party waited, how many tokens each verify step took, what each draft forward yielded).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::args::Strategy;
use crate::backend::{Span, Trace};

/// Where a generation came from.
pub(super) struct Origin<'a> {
    pub(super) sample_index: usize,
    pub(super) sample_id: &'a str,
    pub(super) turn: usize,
    pub(super) strategy: Strategy,
    pub(super) drafter: &'a str,
}

fn spans(spans: &[Span]) -> Value {
    spans
        .iter()
        .map(|s| json!({"t0_us": s.t0, "t1_us": s.t1, "tokens_in": s.n_in}))
        .collect()
}

/// One generation's line: times in µs since its request started (CLOCK_MONOTONIC, the workers'
/// clock). `ar` and `sd` have in-process forwards; `amusd` has the workers' events.
pub(super) fn line(origin: &Origin<'_>, trace: &Trace) -> Value {
    let events: Value = trace
        .events
        .iter()
        .map(|(role, e)| {
            json!({
                "role": format!("{role:?}").to_lowercase(),
                "kind": format!("{:?}", e.kind),
                "t0_us": e.t_start_us,
                "t1_us": e.t_end_us,
                "position": e.position,
                "count": e.count,
                "accepted": e.accepted,
            })
        })
        .collect();
    json!({
        "sample_index": origin.sample_index,
        "sample_id": origin.sample_id,
        "turn": origin.turn,
        "strategy": origin.strategy.name(),
        "drafter": origin.drafter,
        "commits": trace.commits.iter().map(|&(t, n)| json!({"t_us": t, "tokens": n})).collect::<Value>(),
        "verify_forwards": spans(&trace.verify),
        "draft_forwards": spans(&trace.draft),
        "events": events,
        "lost_events": trace.lost_events,
    })
}

/// Writes `lines`, one JSON object per line.
pub(super) fn write(path: &Path, lines: &[Value]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for l in lines {
        serde_json::to_writer(&mut out, l)?;
        out.write_all(b"\n")?;
    }
    out.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}
