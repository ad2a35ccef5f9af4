//! `amusd bench --trace`: every generation's forwards and worker events as one JSON line, the data
//! `--plot` draws for one sample, kept for all of them so where the time went can be read back
//! (which party waited, how many tokens each verify step took, what each draft forward yielded).

use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};

use super::records::write_output;
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
    let mut out = String::new();
    for l in lines {
        out.push_str(&serde_json::to_string(l)?);
        out.push('\n');
    }
    write_output(path, &out)
}
