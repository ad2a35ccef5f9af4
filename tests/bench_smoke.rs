//! `amusd bench` and `amusd report` through the CLI, on two samples of each dataset with the real
//! model (the CI-sized smoke of the evaluation; `scripts/bench.sh` runs the full one). Needs
//! `scripts/fetch-assets.sh` (run by `scripts/test.sh`).

use std::path::Path;
use std::time::Duration;

use amusd_e2e::{amusd_run, require_default_model, s, shm_entries_of, Run};

const TIMEOUT: Duration = Duration::from_secs(600);
const MAX_NEW: usize = 16;

/// Fields of the paper's released `results/*.json` records, which its tooling reads.
const PAPER_FIELDS: [&str; 6] = [
    "total_time",
    "tokens_generated",
    "time_per_token",
    "draft_times",
    "verify_times",
    "accepted_tokens",
];

fn bench(dataset: &str, out: &Path, plot: &Path, trace: &Path) -> Run {
    require_default_model();
    let run = amusd_run(
        &[
            "bench",
            "--dataset",
            dataset,
            "--num-samples",
            "2",
            "--max-new-tokens",
            &MAX_NEW.to_string(),
            "--output",
            s(out),
            "--plot",
            s(plot),
            "--trace",
            s(trace),
        ],
        TIMEOUT,
    );
    assert!(
        run.status.success(),
        "amusd bench --dataset {dataset} failed: {}",
        run.describe()
    );
    assert!(
        shm_entries_of(run.pid).is_empty(),
        "amusd bench left its region in /dev/shm"
    );
    run
}

/// Checks the records of one dataset and returns how many generations each strategy made.
fn check_records(dataset: &str, out: &Path, turns_per_sample: usize) {
    let text = std::fs::read_to_string(out).expect("bench wrote its --output file");
    let records: Vec<serde_json::Value> =
        serde_json::from_str(&text).expect("--output is one JSON list");
    for strategy in ["ar", "sd", "amusd"] {
        let mine: Vec<_> = records
            .iter()
            .filter(|r| r["strategy"] == strategy)
            .collect();
        assert_eq!(
            mine.len(),
            2 * turns_per_sample,
            "{dataset}: {strategy} should have one record per sample and turn: {text}"
        );
        for r in &mine {
            let m = &r["metrics"];
            for f in PAPER_FIELDS {
                assert!(
                    !m[f].is_null(),
                    "{dataset}: record without metrics.{f}: {r}"
                );
            }
            let n = m["tokens_generated"].as_u64().expect("tokens_generated");
            assert!(
                n >= 1 && n as usize <= MAX_NEW,
                "{dataset}: {n} tokens generated with --max-new-tokens {MAX_NEW}: {r}"
            );
            let verify_steps = m["verify_times"].as_array().expect("verify_times").len();
            match strategy {
                // One forward per token, the last token not fed back.
                "ar" => assert!(verify_steps as u64 >= n, "{dataset}: ar record {r}"),
                _ => assert!(
                    verify_steps >= 1 && verify_steps as u64 <= n,
                    "{dataset}: {strategy} record {r}"
                ),
            }
        }
    }
    // A conversation's later turns keep what its earlier turn left cached; first turns start cold.
    for r in &records {
        let cached = r["metrics"]["cached_prompt_tokens"]
            .as_u64()
            .expect("cached_prompt_tokens");
        let prompt = r["prompt_tokens"].as_u64().expect("prompt_tokens");
        match r["turn"].as_u64() {
            Some(1) => assert_eq!(cached, 0, "{dataset}: a first turn found a cache: {r}"),
            _ => assert!(
                cached > prompt / 2 && cached < prompt,
                "{dataset}: a later turn kept {cached} of {prompt} prompt tokens: {r}"
            ),
        }
    }
    // Every sd and amusd generation carries the same token hash as ar's for its sample and turn.
    for r in records.iter().filter(|r| r["strategy"] != "ar") {
        let ar = records
            .iter()
            .find(|a| {
                a["strategy"] == "ar"
                    && a["sample_index"] == r["sample_index"]
                    && a["turn"] == r["turn"]
            })
            .expect("an ar record for every sample");
        assert_eq!(
            r["metrics"]["tokens_hash"], ar["metrics"]["tokens_hash"],
            "{dataset}: {} differs from ar: {r}\n{ar}",
            r["strategy"]
        );
    }
}

/// Checks the `--trace` lines: one per generation, with the forwards (ar, sd) or the workers'
/// events (amusd) that made it, and a commit for every token.
fn check_trace(dataset: &str, path: &Path, turns_per_sample: usize) {
    let text = std::fs::read_to_string(path).expect("bench wrote its --trace file");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each --trace line is one JSON object"))
        .collect();
    for strategy in ["ar", "sd", "amusd"] {
        let mine: Vec<_> = lines.iter().filter(|l| l["strategy"] == strategy).collect();
        assert_eq!(
            mine.len(),
            2 * turns_per_sample,
            "{dataset}: {strategy} trace lines"
        );
        for l in mine {
            let n = |key: &str| l[key].as_array().map_or(0, Vec::len);
            let committed: u64 = l["commits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["tokens"].as_u64().unwrap())
                .sum();
            assert!(
                committed > 0,
                "{dataset}: {strategy} committed nothing: {l}"
            );
            match strategy {
                "ar" => assert!(n("verify_forwards") > 0 && n("draft_forwards") == 0, "{l}"),
                "sd" => assert!(n("verify_forwards") > 0 && n("draft_forwards") > 0, "{l}"),
                _ => {
                    let steps = l["events"].as_array().unwrap().iter().filter(|e| {
                        e["role"] == "verify"
                            && (e["kind"] == "VerifyStep" || e["kind"] == "ArStep")
                    });
                    assert!(
                        steps.count() > 0,
                        "{dataset}: amusd without verify steps: {l}"
                    );
                }
            }
        }
    }
}

#[test]
fn bench_and_report_on_every_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    // MT-Bench asks both of its turns: two records per sample.
    for (dataset, turns) in [("humaneval", 1), ("mt-bench", 2), ("refactor", 1)] {
        let out = dir.path().join(format!("{dataset}.json"));
        let plot = dir.path().join(format!("{dataset}.svg"));
        let trace = dir.path().join(format!("{dataset}.jsonl"));
        let run = bench(dataset, &out, &plot, &trace);
        assert!(
            run.stderr.contains("equal ar's"),
            "{dataset}: no exactness verdict: {}",
            run.describe()
        );
        check_records(dataset, &out, turns);
        check_trace(dataset, &trace, turns);
        let svg = std::fs::read_to_string(&plot).expect("bench wrote its --plot file");
        assert!(
            svg.starts_with("<svg") || svg.starts_with("<?xml"),
            "{dataset}: the plot is not SVG: {}",
            &svg[..svg.len().min(200)]
        );
        for strategy in ["ar", "sd", "amusd"] {
            assert!(
                svg.contains(strategy),
                "{dataset}: the plot has no {strategy} lane"
            );
        }
        outputs.push(out);
    }

    let mut args = vec!["report", "--markdown"];
    args.extend(outputs.iter().map(|p| s(p)));
    let report = amusd_run(&args, Duration::from_secs(30));
    assert!(
        report.status.success(),
        "report failed: {}",
        report.describe()
    );
    let rows: Vec<&str> = report
        .stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| dataset"))
        .collect();
    assert_eq!(
        rows.len(),
        9,
        "3 datasets x 3 strategies: {}",
        report.stdout
    );
    for (dataset, gens) in [("humaneval", 2), ("mt-bench", 4), ("refactor-standin", 2)] {
        for strategy in ["sd", "amusd"] {
            // Prompt lookup drafts ahead of the model by default, and the row says so.
            let row = rows
                .iter()
                .find(|r| {
                    r.starts_with(&format!(
                        "| {dataset} | {strategy} [model+lookup 2-4+history] |"
                    ))
                })
                .unwrap_or_else(|| panic!("no {dataset}/{strategy} row: {}", report.stdout));
            assert!(
                row.contains(&format!("{gens}/{gens}")),
                "{dataset}/{strategy} not identical to ar on every generation: {row}"
            );
        }
    }
}

#[test]
fn bench_on_a_conversation_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chats.jsonl");
    // The RefactorChat shape: the prompt is every turn before the last assistant turn.
    std::fs::write(
        &file,
        concat!(
            r#"{"conversation": [{"role": "user", "content": "Name three primary colours."}, {"role": "assistant", "content": "Red, yellow and blue."}]}"#,
            "\n",
            r#"{"conversation": [{"role": "user", "content": "def add(a, b): return a+b"}, {"role": "assistant", "content": "A function."}, {"role": "user", "content": "Add type hints."}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = dir.path().join("chats.json");
    let plot = dir.path().join("chats.svg");
    let trace = dir.path().join("chats.jsonl");
    let run = bench(s(&file), &out, &plot, &trace);
    assert!(run.stderr.contains("equal ar's"), "{}", run.describe());
    check_records("file", &out, 1);
    check_trace("file", &trace, 1);
}

#[test]
fn bench_rejects_a_malformed_conversation_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, "{\"conversation\": [}\n").unwrap();
    let run = amusd_run(
        &["bench", "--dataset", s(&file), "--num-samples", "1"],
        Duration::from_secs(60),
    );
    assert!(
        !run.status.success(),
        "a malformed file was accepted: {}",
        run.describe()
    );
    let lines: Vec<_> = run.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected a one-line error: {}",
        run.describe()
    );
    assert!(
        lines[0].starts_with("amusd: error:") && lines[0].contains("bad.jsonl"),
        "the error should name the file: {}",
        run.describe()
    );
}

/// `--compare-lookup`: each sample runs through amusd twice on the same workers, with the lookup
/// ahead of the draft model and with the model alone; both equal ar, the model-alone runs draft
/// nothing by lookup, and the report gives each drafter its row.
#[test]
fn bench_compares_the_draft_with_and_without_lookup() {
    require_default_model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("compare.json");
    let run = amusd_run(
        &[
            "bench",
            "--dataset",
            "refactor",
            "--num-samples",
            "2",
            "--max-new-tokens",
            &MAX_NEW.to_string(),
            "--strategies",
            "ar,amusd",
            "--compare-lookup",
            "--output",
            s(&out),
        ],
        TIMEOUT,
    );
    assert!(run.status.success(), "{}", run.describe());
    assert!(
        run.stderr.contains("all 4 sd/amusd outputs equal ar's"),
        "{}",
        run.describe()
    );
    let text = std::fs::read_to_string(&out).expect("bench wrote its --output file");
    let records: Vec<serde_json::Value> = serde_json::from_str(&text).expect("one JSON list");
    let amusd = |drafter: &str| -> Vec<&serde_json::Value> {
        records
            .iter()
            .filter(|r| r["strategy"] == "amusd" && r["drafter"] == drafter)
            .collect()
    };
    let (alone, combined) = (amusd("model"), amusd("model+lookup 2-4+history"));
    assert_eq!((alone.len(), combined.len()), (2, 2), "{text}");
    for r in &alone {
        assert_eq!(r["metrics"]["proposed_lookup"], 0, "lookup drafted: {r}");
    }
    let order: Vec<(u64, &str)> = records
        .iter()
        .map(|r| {
            let drafter = r["drafter"].as_str().unwrap_or_default();
            (r["sample_index"].as_u64().unwrap_or(99), drafter)
        })
        .collect();
    assert_eq!(
        order,
        [
            (0, ""),
            (0, "model+lookup 2-4+history"),
            (0, "model"),
            (1, ""),
            (1, "model+lookup 2-4+history"),
            (1, "model")
        ],
        "each sample through every arm in turn"
    );
    let report = amusd_run(&["report", "--markdown", s(&out)], Duration::from_secs(30));
    assert!(report.status.success(), "{}", report.describe());
    for row in [
        "| refactor-standin | amusd |",
        "| refactor-standin | amusd [model+lookup 2-4+history] |",
    ] {
        assert!(
            report.stdout.contains(row),
            "no row {row}: {}",
            report.stdout
        );
    }
}

#[test]
fn compare_lookup_needs_a_draft_model_with_the_lookup() {
    for flags in [&["--no-draft-lookup"][..], &["--draft-model", "lookup"]] {
        let mut args = vec!["bench", "--dataset", "refactor", "--compare-lookup"];
        args.extend_from_slice(flags);
        let run = amusd_run(&args, Duration::from_secs(60));
        assert!(
            !run.status.success(),
            "{flags:?} accepted: {}",
            run.describe()
        );
        assert!(
            run.stderr.starts_with("amusd: error:") && run.stderr.contains("--compare-lookup"),
            "{}",
            run.describe()
        );
    }
}
