//! `amusd serve` on the real model (SmolLM2-135M-Instruct, the worker pair): chat and completions,
//! streamed and not, and without prompt lookup (`"prompt_lookup": false`), equal `amusd generate
//! --strategy ar`; a seeded sampled request equals ar's
//! sample; and the official `openai` Python client (pinned, in a venv under target/) checks the same
//! through its own parsing, plus `/metrics` through the Prometheus parser. Kept short: a few
//! requests of 24 tokens.

// Shared with tests/serve.rs; not every helper is used here.
#[allow(dead_code)]
mod serve_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use amusd_e2e::{amusd_run, require_default_model};
use serde_json::json;
use serve_common::{reply_text, start};

const MAX: usize = 24;
const CHAT: &str = "What is the capital of France?";
const RAW: &str = "The three primary colors are";

/// `amusd generate --strategy ar --json ARGS...`'s text.
fn ar_text(args: &[&str]) -> String {
    let max = MAX.to_string();
    let mut all = vec![
        "generate",
        "--strategy",
        "ar",
        "--json",
        "--max-new-tokens",
        &max,
    ];
    all.extend_from_slice(args);
    let run = amusd_run(&all, Duration::from_secs(300));
    run.json()["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text: {}", run.describe()))
        .to_string()
}

#[test]
fn serve_equals_generate_ar_and_the_openai_client_agrees() {
    require_default_model();
    let chat_ar = ar_text(&["--prompt", CHAT]);
    let raw_ar = ar_text(&["--raw", "--prompt", RAW]);
    let sampled_ar = ar_text(&["--prompt", CHAT, "--temperature", "0.8", "--seed", "7"]);
    let s = start(&["--strategy", "amusd"], Duration::from_secs(300));
    let chat = json!({"messages": [{"role": "user", "content": CHAT}], "max_tokens": MAX});
    let r = s.post("/v1/chat/completions", &chat);
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(reply_text(&r.json), chat_ar, "non-streamed chat vs ar");
    let mut streamed = chat.clone();
    streamed["stream"] = true.into();
    let (text, _) = s.stream("/v1/chat/completions", &streamed).rest();
    assert_eq!(text, chat_ar, "streamed chat vs ar");
    // The draft model alone for this request: the same text.
    let mut model_alone = chat.clone();
    model_alone["prompt_lookup"] = false.into();
    let r = s.post("/v1/chat/completions", &model_alone);
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(
        reply_text(&r.json),
        chat_ar,
        "chat without prompt lookup vs ar"
    );

    let python = Command::new("scripts/openai-venv.sh")
        .current_dir(workspace())
        .output()
        .expect("cannot run scripts/openai-venv.sh");
    assert!(
        python.status.success(),
        "cannot set up the openai client's venv: {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let python = String::from_utf8(python.stdout).unwrap();
    let expect = json!({
        "max_tokens": MAX, "chat_prompt": CHAT, "chat": chat_ar, "raw_prompt": RAW, "raw": raw_ar,
        "sampled": sampled_ar, "temperature": 0.8, "seed": 7,
    });
    let out = Command::new(python.trim())
        .arg(workspace().join("tests/openai_client.py"))
        .env("AMUSD_BASE_URL", &s.base)
        .env("AMUSD_EXPECT", expect.to_string())
        .output()
        .expect("cannot run tests/openai_client.py");
    assert!(
        out.status.success(),
        "openai client checks failed:\n{}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    s.terminate(Duration::from_secs(60));
}

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}
