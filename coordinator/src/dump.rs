//! `amusd dump`: the state of amusd's shared-memory regions, live or left by a crashed run.

use std::process::ExitCode;
use std::time::Duration;

use amusd_model::tokenizer::Tokenizer;
use amusd_shm::{escape_name, unix_ms, RegionInfo, Role, Shm, TOKEN_CAPACITY};
use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// The region to show (as listed, e.g. /amusd-1234-0123456789abcdef). Without it: list them all.
    pub name: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Refresh every half second until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Decode tokens with this model's tokenizer (`PATH[:FORMAT]`).
    #[arg(long, value_name = "SPEC")]
    pub tokenizer: Option<String>,
    /// Remove the regions whose coordinator is dead, then list what is left.
    #[arg(long)]
    pub gc: bool,
    /// How many recent tokens and events to show.
    #[arg(long, default_value_t = 12)]
    pub last: usize,
}

pub fn run(args: DumpArgs) -> Result<ExitCode> {
    crate::output::die_on_closed_stdout();
    if args.gc {
        for name in Shm::gc() {
            eprintln!("removed {}", escape_name(&name));
        }
    }
    let tokenizer = match &args.tokenizer {
        Some(spec) => Some(amusd_model::loader::load_text(&spec.parse()?)?.tokenizer),
        None => None,
    };
    loop {
        let out = match &args.name {
            None => list_json(&Shm::list()),
            Some(name) => region_json(&normalise(name), tokenizer.as_ref(), args.last)?,
        };
        if args.watch {
            print!("\x1b[2J\x1b[H");
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else if args.name.is_none() {
            print_list(&out);
        } else {
            print_region(&out);
        }
        if !args.watch {
            return Ok(ExitCode::SUCCESS);
        }
        // A display refresh, not synchronisation.
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn normalise(name: &str) -> String {
    if name.starts_with('/') {
        name.to_string()
    } else {
        format!("/{name}")
    }
}

fn list_json(regions: &[RegionInfo]) -> serde_json::Value {
    json!(regions
        .iter()
        .map(|r| json!({
            "name": escape_name(&r.name),
            "size": r.size,
            "owner_uid": r.owner_uid,
            "coordinator_pid": r.coordinator_pid,
            "coordinator_alive": r.coordinator_alive,
            "age_s": r.header.map(|h| unix_ms().saturating_sub(h.created_unix_ms) / 1000),
            "problem": r.problem,
        }))
        .collect::<Vec<_>>())
}

fn print_list(v: &serde_json::Value) {
    let rows = v.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no amusd regions");
        return;
    }
    println!(
        "{:<40} {:>9} {:>10} {:>8}  note",
        "region", "pid", "coordinator", "age"
    );
    for r in rows {
        let alive = match r["coordinator_alive"].as_bool() {
            Some(true) => "alive",
            Some(false) => "dead",
            None => "unknown",
        };
        let age = r["age_s"]
            .as_u64()
            .map(|s| format!("{s}s"))
            .unwrap_or_else(|| "-".into());
        let note = match (alive, r["problem"].as_str()) {
            (_, Some(p)) => p.to_string(),
            ("dead", _) => "left by a crashed run: `amusd dump --gc` removes it".to_string(),
            _ => String::new(),
        };
        println!(
            "{:<40} {:>9} {:>10} {:>8}  {note}",
            r["name"].as_str().unwrap_or("?"),
            r["coordinator_pid"]
                .as_u64()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            alive,
            age
        );
    }
}

fn decode(t: Option<&Tokenizer>, ids: &[u32]) -> Option<String> {
    t.and_then(|t| t.decode(ids, false).ok())
}

fn region_json(name: &str, tok: Option<&Tokenizer>, last: usize) -> Result<serde_json::Value> {
    // Read-only: inspecting a live run can never disturb it.
    let shm = Shm::attach_read_only(name)
        .with_context(|| format!("cannot inspect {}", escape_name(name)))?;
    let r = shm.region();
    let alive = Shm::list()
        .into_iter()
        .find(|i| i.name == name)
        .and_then(|i| i.coordinator_alive);
    let req = r.read_request().ok();
    let vlen = r.verified_len();
    let vtail = r.read_verified(vlen.saturating_sub(last), vlen);
    let draft = r.read_draft(0, 0).ok();
    let dlen = draft.as_ref().map(|d| d.len).unwrap_or(0);
    let dtail = r
        .read_draft(dlen.saturating_sub(last), last)
        .map(|d| d.tokens)
        .unwrap_or_default();
    let workers: Vec<_> = Role::ALL
        .iter()
        .map(|&role| {
            let w = r.worker_snapshot(role);
            json!({
                "role": role.name(),
                "pid": w.pid,
                "state": w.state.map(|s| format!("{s:?}")),
                "heartbeat_age_ms": r.heartbeat_age_ms(role),
                "restarts": w.restarts,
                "exit_status": format!("{:?}", w.exit_status),
                "request_id": w.request_id,
                "device": w.device,
                "model": w.model,
                "steps": w.steps,
                "tokens": w.tokens,
                "rollbacks": w.rollbacks,
                "proposed": w.proposed,
                "accepted": w.accepted,
                "last_error": w.last_error,
                "recent_events": r.events(role).recent_events(last).iter().map(|e| json!({
                    "kind": format!("{:?}", e.kind),
                    "request_id": e.request_id,
                    "position": e.position,
                    "count": e.count,
                    "accepted": e.accepted,
                    "duration_us": e.t_end_us.saturating_sub(e.t_start_us),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(json!({
        "name": escape_name(name),
        "coordinator_pid": r.coordinator_pid(),
        "coordinator_alive": alive,
        "token_capacity": TOKEN_CAPACITY,
        "request": req.as_ref().map(|q| json!({
            "id": q.request_id,
            "state": format!("{:?}", q.state),
            "prompt_len": q.prompt_len,
            "max_new_tokens": q.max_new_tokens,
            "stop_tokens": q.stop_tokens,
            "sampling": amusd_spec::worker::sampling_of(&q.sampling).ok().map(|s| crate::args::sampling_json(&s)),
            "no_draft_lookup": q.sampling.no_draft_lookup,
            "cache_prompt": q.sampling.cache_prompt,
            // 0: none; 1 + k: the tokens' and their k most likely alternatives'.
            "logprobs": q.sampling.logprobs,
            "finish_reason": format!("{:?}", q.finish_reason),
            "error": q.error_text,
            "shutdown": q.shutdown,
        })),
        "verified": {"len": vlen, "last_tokens": vtail, "last_text": decode(tok, &vtail)},
        "draft": {
            "len": dlen,
            "request_id": draft.as_ref().map(|d| d.request_id),
            "epoch": draft.as_ref().map(|d| d.epoch),
            "last_tokens": dtail,
            "last_text": decode(tok, &dtail),
        },
        "workers": workers,
        "split_prefill": split_json(r),
    }))
}

/// The last split prefill job ([`amusd_shm::SplitSection`]) and whether each worker takes part.
fn split_json(r: &amusd_shm::Region) -> serde_json::Value {
    let (w, job) = (r.split_word(), r.split_job());
    json!({
        "draft_worker_helps": r.helper() != 0,
        "verify_worker_splits": r.verifier() != 0,
        "job": w.seq,
        "state": format!("{:?}", w.state),
        "request_id": job.request_id,
        "draft_positions": job.split,
        "positions": job.end,
        "blocks_published": w.blocks,
        "blocks": job.layers,
        "slots": job.slots,
        "blocks_taken_in": r.taken_in(w.seq),
        "blocks_adopted": r.adopted(w.seq),
    })
}

fn print_region(v: &serde_json::Value) {
    let alive = match v["coordinator_alive"].as_bool() {
        Some(true) => "alive",
        Some(false) => "dead (crashed run; `amusd dump --gc` removes the region)",
        None => "unknown",
    };
    println!(
        "region {}  coordinator pid {} {alive}",
        v["name"].as_str().unwrap_or("?"),
        v["coordinator_pid"]
    );
    print_request(&v["request"]);
    for (label, b) in [("verified", &v["verified"]), ("draft", &v["draft"])] {
        println!("{label:<8} len {:<6} last {}", b["len"], b["last_tokens"]);
        if let Some(t) = b["last_text"].as_str() {
            println!("{:<8}            {t:?}", "");
        }
    }
    print_split(&v["split_prefill"]);
    for w in v["workers"].as_array().into_iter().flatten() {
        print_worker(w);
    }
}

fn print_request(q: &serde_json::Value) {
    if q.is_null() {
        println!("request: (being updated)");
        return;
    }
    println!(
        "request {}: {}  prompt {} tokens, max new {}, stop {}, finish {}{}",
        q["id"],
        q["state"].as_str().unwrap_or("?"),
        q["prompt_len"],
        q["max_new_tokens"],
        q["stop_tokens"],
        q["finish_reason"].as_str().unwrap_or("?"),
        q["error"]
            .as_str()
            .filter(|e| !e.is_empty())
            .map(|e| format!(", error: {e}"))
            .unwrap_or_default()
    );
}

fn print_split(s: &serde_json::Value) {
    if s["job"] == 0 {
        return;
    }
    println!(
        "split prefill job {}: {} for request {}, positions 0..{} by the draft worker, \
         ..{} by the verify worker; {} of {} blocks published, {} slots, {} taken in, {} \
         adopted",
        s["job"],
        s["state"].as_str().unwrap_or("?"),
        s["request_id"],
        s["draft_positions"],
        s["positions"],
        s["blocks_published"],
        s["blocks"],
        s["slots"],
        s["blocks_taken_in"],
        s["blocks_adopted"]
    );
}

fn print_worker(w: &serde_json::Value) {
    // A worker the coordinator has not reaped (alive, or never started) has no exit to show.
    let exit = match w["exit_status"].as_str() {
        Some("NotReaped") | None => String::new(),
        Some(e) => format!(", last exit {e}"),
    };
    println!(
        "{} worker: pid {} {} heartbeat {} ms ago, {} on {}, restarts {}{exit}",
        w["role"].as_str().unwrap_or("?"),
        w["pid"],
        w["state"].as_str().unwrap_or("?"),
        w["heartbeat_age_ms"],
        w["model"].as_str().unwrap_or(""),
        w["device"].as_str().unwrap_or(""),
        w["restarts"]
    );
    println!(
        "    steps {} tokens {} rollbacks {} proposed {} accepted {}",
        w["steps"], w["tokens"], w["rollbacks"], w["proposed"], w["accepted"]
    );
    if let Some(e) = w["last_error"].as_str().filter(|e| !e.is_empty()) {
        println!("    last error: {e}");
    }
    for e in w["recent_events"].as_array().into_iter().flatten() {
        println!(
            "    {:<10} req {} pos {} count {} accepted {} {} us",
            e["kind"].as_str().unwrap_or("?"),
            e["request_id"],
            e["position"],
            e["count"],
            e["accepted"],
            e["duration_us"]
        );
    }
}
