//! Tiny random-weight models through the CLI: the Hugging Face safetensors loader agrees with the
//! GGUF loader token for token, and ar, sd and amusd agree with each other whether the draft is the
//! verify model itself (everything accepted) or an unrelated model (almost nothing accepted, rollback
//! after rollback).

use std::path::{Path, PathBuf};
use std::time::Duration;

use amusd_e2e::{amusd_run, assert_cleaned_up, s, tiny_gguf, tiny_hf, GgmlDType, Run, TinyModel};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A tiny model with its own output matrix. (With tied embeddings, `TinyModel::default()`, the
/// random model just repeats the last prompt token, which would make these checks weak.)
fn untied(seed: u64) -> TinyModel {
    TinyModel {
        seed,
        tie_embeddings: false,
        ..TinyModel::default()
    }
}

fn distinct(tokens: &[u32]) -> usize {
    tokens
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

fn generate(strategy: &str, verify: &str, draft: &str, prompt: &str, max_new: usize) -> Run {
    let max_new = max_new.to_string();
    let mut args = vec!["generate"];
    args.extend(amusd_e2e::model_args(strategy, verify, draft));
    args.extend([
        "--prompt",
        prompt,
        "--raw",
        "--max-new-tokens",
        &max_new,
        "--json",
    ]);
    if strategy == "amusd" {
        // A tiny verify model steps in microseconds, usually before the draft has published
        // anything; waiting for the draft makes it take part in every step, so the drafting and
        // rollback paths are exercised, not just autoregressive verify steps.
        args.extend(["--verify-wait-us", "1000000"]);
    }
    let run = amusd_run(&args, TIMEOUT);
    assert!(
        run.status.success(),
        "{strategy} failed: {}",
        run.describe()
    );
    assert_cleaned_up(&run);
    run
}

#[test]
fn safetensors_and_gguf_give_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    // The tied default (degenerate output, but the format the README describes) and two untied
    // models with varied output. No greedy near-ties for these prompts: when this test was written
    // every run produced the same tokens from both formats.
    for (i, model) in [TinyModel::default(), untied(7), untied(99)]
        .iter()
        .enumerate()
    {
        let hf = tiny_hf(dir.path(), &format!("tiny-hf-{i}"), model);
        let gguf = tiny_gguf(dir.path(), &format!("tiny-{i}.gguf"), model, GgmlDType::F32);
        same_tokens_from_both_formats(&hf, &gguf, model.tie_embeddings);
    }
}

fn same_tokens_from_both_formats(hf: &Path, gguf: &Path, tied: bool) {
    for (prompt, max_new) in [("hello", 20), ("The quick brown fox", 32)] {
        let from_hf = generate("ar", s(hf), s(hf), prompt, max_new);
        let from_gguf = generate("ar", s(gguf), s(gguf), prompt, max_new);
        let (a, b) = (from_hf.json(), from_gguf.json());
        assert_eq!(
            a["prompt_tokens"], b["prompt_tokens"],
            "the two formats tokenize '{prompt}' differently"
        );
        assert_eq!(
            from_hf.tokens(),
            from_gguf.tokens(),
            "'{prompt}': safetensors and GGUF disagree\nHF: {}\nGGUF: {}",
            from_hf.describe(),
            from_gguf.describe()
        );
        assert_eq!(
            from_hf.tokens().len(),
            max_new,
            "'{prompt}': expected {max_new} tokens: {}",
            from_hf.describe()
        );
        if !tied {
            assert!(
                distinct(&from_hf.tokens()) > 5,
                "'{prompt}': degenerate output: {}",
                from_hf.describe()
            );
        }
    }
}

/// Runs ar, sd and amusd with `draft`, checks all three commit the same tokens, and returns the sd
/// and amusd JSON outputs.
fn strategies_agree(
    verify: &Path,
    draft: &Path,
    prompt: &str,
    max_new: usize,
) -> (serde_json::Value, serde_json::Value) {
    let ar = generate("ar", s(verify), s(draft), prompt, max_new);
    let expected = ar.tokens();
    assert!(
        !expected.is_empty(),
        "ar generated nothing: {}",
        ar.describe()
    );
    let mut out = Vec::new();
    for strategy in ["sd", "amusd"] {
        let run = generate(strategy, s(verify), s(draft), prompt, max_new);
        assert_eq!(
            run.tokens(),
            expected,
            "{strategy} with draft {} disagrees with ar on '{prompt}'\nar: {}\n{strategy}: {}",
            draft.display(),
            ar.describe(),
            run.describe()
        );
        let json = run.json();
        assert_eq!(json["finish_reason"], ar.json()["finish_reason"]);
        out.push(json);
    }
    let amusd = out.pop().unwrap();
    let sd = out.pop().unwrap();
    (sd, amusd)
}

fn metric(v: &serde_json::Value, name: &str) -> f64 {
    v["metrics"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("no metrics.{name} in {v}"))
}

#[test]
fn strategies_agree_when_the_draft_is_the_verify_model() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny_hf(dir.path(), "tiny-hf", &untied(7));
    for prompt in ["hello", "Once upon a time"] {
        let (sd, amusd) = strategies_agree(&hf, &hf, prompt, 40);
        // The same weights on the same batch-invariant kernels: every drafted token is right.
        for (name, v) in [("sd", &sd), ("amusd", &amusd)] {
            assert!(metric(v, "proposed") > 0.0, "{name} drafted nothing: {v}");
            assert_eq!(
                metric(v, "accepted"),
                metric(v, "proposed"),
                "{name}: a draft identical to the verify model had tokens rejected: {v}"
            );
        }
        assert_eq!(metric(&sd, "rollbacks"), 0.0, "sd rolled back: {sd}");
    }
}

#[test]
fn strategies_agree_with_an_unrelated_draft() {
    let dir = tempfile::tempdir().unwrap();
    let verify = tiny_hf(dir.path(), "verify", &untied(7));
    let draft = tiny_hf(dir.path(), "draft", &untied(1234));
    for prompt in ["hello", "Once upon a time"] {
        let (sd, amusd) = strategies_agree(&verify, &draft, prompt, 60);
        // Random weights with another seed: the draft is almost always wrong, so the verify model
        // rejects and the draft rolls back over and over.
        for (name, v) in [("sd", &sd), ("amusd", &amusd)] {
            assert!(metric(v, "proposed") > 0.0, "{name} drafted nothing: {v}");
            assert!(
                metric(v, "acceptance_rate") < 0.5,
                "{name}: an unrelated draft was accepted suspiciously often: {v}"
            );
            assert!(
                metric(v, "rollbacks") > 0.0,
                "{name}: no rollbacks with an unrelated draft: {v}"
            );
        }
    }
}

#[test]
fn strategies_agree_with_a_quantized_gguf_draft_of_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = untied(7);
    let verify = tiny_hf(dir.path(), "verify", &model);
    let draft = tiny_gguf(dir.path(), "draft-q8_0.gguf", &model, GgmlDType::Q8_0);
    let (sd, amusd) = strategies_agree(&verify, &draft, "hello", 40);
    for (name, v) in [("sd", &sd), ("amusd", &amusd)] {
        assert!(metric(v, "proposed") > 0.0, "{name} drafted nothing: {v}");
    }
}

/// A q4_k_m-style checkpoint (q4_k, V and down in q6_k) verifying in f32 with its k-quants kept
/// as stored, drafting as stored: every strategy writes `ar`'s tokens.
#[test]
fn strategies_agree_on_a_k_quant_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = TinyModel {
        hidden: 256,
        intermediate: 512,
        ..untied(7)
    };
    let path = dir.path().join("tiny-q4_k_m.gguf");
    model
        .write_gguf_typed(&path, |name| {
            match name.contains("attn_v") || name.contains("ffn_down") {
                true => GgmlDType::Q6K,
                false => GgmlDType::Q4K,
            }
        })
        .unwrap();
    let verify = PathBuf::from(format!("{}:f32", s(&path)));
    let draft = PathBuf::from(format!("{}:stored", s(&path)));
    let (sd, amusd) = strategies_agree(&verify, &draft, "hello", 40);
    for (name, v) in [("sd", &sd), ("amusd", &amusd)] {
        assert!(metric(v, "accepted") > 0.0, "{name} accepted nothing: {v}");
    }
}

#[test]
fn strategies_agree_with_a_draft_whose_head_is_restricted() {
    let dir = tempfile::tempdir().unwrap();
    let model = untied(7);
    let verify = tiny_hf(dir.path(), "verify", &model);
    // The same weights, proposing only token ids below 128: whatever the verify model chooses
    // above them is rejected and corrected, never lost.
    let draft = PathBuf::from(format!("{}:head=128", s(&verify)));
    let (sd, amusd) = strategies_agree(&verify, &draft, "Once upon a time", 40);
    for (name, v) in [("sd", &sd), ("amusd", &amusd)] {
        assert!(metric(v, "proposed") > 0.0, "{name} drafted nothing: {v}");
    }
}

#[test]
fn a_reader_that_leaves_stops_the_generation_without_a_panic() {
    // `amusd generate ... | head -c 5`: println! panicked on the closed pipe (exit 101). Now the
    // pair stops at the next tokens and amusd exits 0, cleaning up as after any generation.
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_gguf(dir.path(), "m", &untied(3), GgmlDType::F32);
    for strategy in ["ar", "amusd"] {
        let mut child = amusd_e2e::amusd()
            .args([
                "generate",
                "--strategy",
                strategy,
                "--raw",
                "--prompt",
                "hello",
            ])
            .args(["--verify-model", s(&model), "--draft-model", s(&model)])
            .args(["--max-new-tokens", "400"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{strategy}: {stderr}");
        assert!(!stderr.contains("panicked"), "{strategy}: {stderr}");
        // Stopped at the first tokens it could not write, not after all 400.
        assert!(
            !stderr.contains("generated 400 tokens"),
            "{strategy}: {stderr}"
        );
        assert!(
            amusd_e2e::shm_entries_of(pid).is_empty(),
            "{strategy}: region left"
        );
        assert!(
            amusd_e2e::workers_of(pid).is_empty(),
            "{strategy}: workers left"
        );
    }
}
