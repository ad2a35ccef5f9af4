//! `amusd serve` with fake models (no weights, known outputs): concurrent clients, the queue's 429,
//! a client that leaves mid-stream, a verify worker killed mid-stream, bad input, SIGTERM.

mod serve_common;

use std::process::Command;
use std::time::{Duration, Instant};

use amusd_e2e::bin;
use amusd_spec::fake::{FakeDecoder, FakeModel};
use amusd_spec::generate::autoregressive;
use amusd_spec::{Finish, StopCriteria, Verifier};
use serde_json::json;
use serve_common::{chunk_text, reply_text, start, Served};

const READY: Duration = Duration::from_secs(60);
const EXIT: Duration = Duration::from_secs(60);

fn models(verify: &str, draft: &str) -> Vec<String> {
    ["--verify-model", verify, "--draft-model", draft]
        .map(String::from)
        .to_vec()
}

fn serve(verify: &str, draft: &str, extra: &[&str]) -> Served {
    let mut args = models(verify, draft);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start(&args, READY)
}

/// What greedy decoding with the fake verify model gives for a completion prompt (the fake codec
/// takes the prompt's bytes as ids and prints each id in decimal): the text and finish reason.
fn expected(verify: &str, prompt: &str, max_new: usize) -> (String, &'static str) {
    let truth = FakeModel::parse(verify).unwrap();
    let ids: Vec<u32> = prompt.bytes().map(|b| u32::from(b) % truth.vocab).collect();
    let stop = StopCriteria {
        stop_ids: if truth.eos_every > 0 {
            vec![truth.eos]
        } else {
            Vec::new()
        },
        max_new_tokens: max_new,
    };
    let mut v = Verifier::new(FakeDecoder::new(truth));
    let g = autoregressive(&mut v, &ids, &stop, &Default::default(), &mut |_, _| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    let text = g.tokens.iter().map(|t| format!("{t} ")).collect();
    let finish = if g.finish == Finish::Stop {
        "stop"
    } else {
        "length"
    };
    (text, finish)
}

#[test]
fn eight_clients_at_once_are_all_served_exactly() {
    let verify = "fake:vocab=512,seed=11,us=200,eos_every=40";
    let draft = "fake:vocab=512,seed=11,eos_every=40,err=0.15,us=100";
    let s = serve(verify, draft, &["--queue", "8"]);
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..8)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    let prompt = format!("client {i} asks");
                    let body = json!({"prompt": prompt, "max_tokens": 48, "stream": i % 2 == 0});
                    let (text, finish) = if i % 2 == 0 {
                        s.stream("/v1/completions", &body).rest()
                    } else {
                        let r = s.post("/v1/completions", &body);
                        assert_eq!(r.status, 200, "{}", r.json);
                        let f = r.json["choices"][0]["finish_reason"]
                            .as_str()
                            .map(String::from);
                        (reply_text(&r.json), f)
                    };
                    let (want, want_finish) = expected(verify, &prompt, 48);
                    assert_eq!(text, want, "client {i}");
                    assert_eq!(finish.as_deref(), Some(want_finish), "client {i}");
                })
            })
            .collect();
        for c in clients {
            c.join().expect("a client failed");
        }
    });
    let served = s.metric(r#"amusd_http_requests_total{endpoint="/v1/completions",status="200"} "#);
    assert_eq!(served, 8.0);
    // llama.cpp's own endpoint, streamed: the same text.
    let prompt = "a llama.cpp client asks";
    let body = json!({"prompt": prompt, "n_predict": 48, "stream": true});
    let text = s.stream("/completion", &body).llama_rest();
    assert_eq!(text, expected(verify, prompt, 48).0);
    s.terminate(EXIT);
}

/// A fake model for both workers at 5 ms a token (a 64-position prefill chunk ~85 ms): slow
/// enough that a request is still running when its client leaves.
const SLOW: &str = "fake:vocab=512,seed=5,us=5000";

/// Queues a short request (`"next"`, 8 tokens) behind the one running, runs `meanwhile` once it
/// waits, then lets the running request's client go (`leave`): the queued request must be served
/// exactly; returns how long it took from the client's leaving.
fn queued_after_leaving(
    s: &Served,
    verify: &str,
    meanwhile: impl FnOnce(),
    leave: impl FnOnce(),
) -> Duration {
    std::thread::scope(|scope| {
        let queued = scope.spawn(|| {
            let r = s.post(
                "/v1/completions",
                &json!({"prompt": "next", "max_tokens": 8}),
            );
            (r, Instant::now())
        });
        amusd_e2e::wait_until("one queued request", Duration::from_secs(30), || {
            s.metric("amusd_queue_depth ") == 1.0
        });
        meanwhile();
        let left = Instant::now();
        leave();
        let (r, done) = queued.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.json);
        assert_eq!(reply_text(&r.json), expected(verify, "next", 8).0);
        done - left
    })
}

/// One request runs (slowly), one waits in a queue of one, the third is refused with 429; the
/// running one's client hangs up, and the waiting one is served at once and exactly.
#[test]
fn queue_overflow_gives_429_and_a_departed_client_frees_the_pair() {
    // Undisturbed, the long request would take 20 s or more (4000 draft forwards of 5 ms).
    let (verify, s) = (SLOW, serve(SLOW, SLOW, &["--queue", "1"]));
    let mut long = s.stream(
        "/v1/completions",
        &json!({"prompt": "long", "max_tokens": 4000, "stream": true}),
    );
    let first = long.next_data().expect("a first chunk");
    assert!(!chunk_text(&serde_json::from_str(&first).unwrap()).is_empty());
    let refuse_a_third = || {
        let refused = s.post(
            "/v1/completions",
            &json!({"prompt": "third", "max_tokens": 8}),
        );
        assert_eq!(refused.status, 429, "{}", refused.json);
        assert!(refused.retry_after.is_some(), "429 without Retry-After");
        assert_eq!(refused.json["error"]["code"], "rate_limit_exceeded");
    };
    let waited = queued_after_leaving(&s, verify, refuse_a_third, || drop(long));
    // Far less than the 20 s the abandoned request had left: it was cancelled.
    assert!(
        waited < Duration::from_secs(15),
        "the queued request waited {waited:?}"
    );
    s.terminate(EXIT);
}

/// A streamed request whose client leaves while its long prompt is still prefilled (nothing
/// sent yet) is cancelled then, not at its first token: the request queued behind it is served
/// long before that prefill would have ended.
#[test]
fn a_client_that_leaves_during_the_prefill_frees_the_pair() {
    // 6000 prompt tokens in chunks of 64 at ~85 ms each: over 8 s of prefill, undisturbed.
    let (verify, s) = (SLOW, serve(SLOW, SLOW, &["--queue", "1"]));
    let prompt = "long ".repeat(1200);
    let long = s.stream(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 8, "stream": true}),
    );
    // Its stream opens when it is queued, not when it runs: wait for the decode thread to take
    // it, or the next request finds the queue of one still full (a 429 seen once under CI load).
    amusd_e2e::wait_until("the long request running", Duration::from_secs(30), || {
        s.metric("amusd_queue_depth ") == 0.0
    });
    let waited = queued_after_leaving(&s, verify, || {}, || drop(long));
    assert!(
        waited < Duration::from_secs(4),
        "the queued request waited {waited:?}\n{}",
        s.log()
    );
    s.terminate(EXIT);
}

/// With a budget of one restart, the verify worker is killed mid-stream in two requests in turn:
/// each text is exact, and the second kill is within budget again (the budget is per request, not
/// per server life).
#[test]
fn a_verify_worker_killed_mid_stream_leaves_the_text_unchanged() {
    let verify = "fake:vocab=512,seed=9,us=1000";
    let draft = "fake:vocab=512,seed=9,err=0.1,us=500";
    let s = serve(verify, draft, &["--max-restarts", "1"]);
    for round in 1..=2 {
        let body = json!({"messages": [{"role": "user", "content": "tell me"}], "max_tokens": 1500, "stream": true});
        let mut stream = s.stream("/v1/chat/completions", &body);
        // The opening chunk (role), then the first text: the request is being decoded.
        let mut text = String::new();
        while text.is_empty() {
            let d = stream.next_data().expect("the stream ended early");
            text.push_str(&chunk_text(&serde_json::from_str(&d).unwrap()));
        }
        let kill = Command::new(bin("amusd"))
            .args(["worker-kill", "verify", "--region", &s.region()])
            .output()
            .unwrap();
        assert!(
            kill.status.success(),
            "{}",
            String::from_utf8_lossy(&kill.stderr)
        );
        let (rest, finish) = stream.rest();
        text.push_str(&rest);
        // The chat prompt of a fake model is the messages' contents.
        assert_eq!(text, expected(verify, "tell me", 1500).0, "round {round}");
        assert_eq!(finish.as_deref(), Some("length"), "round {round}");
        amusd_e2e::wait_until(
            "a worker restart in /metrics",
            Duration::from_secs(30),
            || s.metric("amusd_worker_restarts_total ") >= f64::from(round),
        );
    }
    let log = s.terminate(EXIT);
    assert!(log.contains("verify"), "{log}");
}

/// `amusd worker-kill verify` on the server's region: the pid it signalled, or None when it
/// refused (no running worker recorded) or signalled `avoid` again (a worker killed before, not
/// reaped yet).
fn kill_verify(s: &Served, avoid: Option<u32>) -> Option<u32> {
    let out = Command::new(bin("amusd"))
        .args(["worker-kill", "verify", "--region", &s.region()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    let pid = said.split("(pid ").nth(1)?.split(')').next()?.parse().ok();
    (out.status.success() && pid != avoid).then_some(pid?)
}

/// With a budget of one restart, the verify worker is killed twice while the server is idle: the
/// budget runs out and `/health` says 503 and why (the hang timeout, which paces the idle
/// retries, is long, so nothing else starts it again); the next request starts it again at once
/// and is served exactly, and `/health` is 200 after it. Before, the server stayed down for good
/// with `/health` at 200.
#[test]
fn a_worker_whose_restarts_ran_out_is_started_again_by_the_next_request() {
    let verify = "fake:vocab=512,seed=9,us=1000";
    let draft = "fake:vocab=512,seed=9,err=0.1,us=500";
    let args = ["--max-restarts", "1", "--hang-timeout-ms", "120000"];
    let s = serve(verify, draft, &args);
    let mut first = None;
    amusd_e2e::wait_until("the verify worker killed", READY, || {
        first = kill_verify(&s, None);
        first.is_some()
    });
    amusd_e2e::wait_until("its replacement killed", READY, || {
        kill_verify(&s, first).is_some()
    });
    amusd_e2e::wait_until("/health to say 503", READY, || s.get("/health").0 == 503);
    let (_, health) = s.get("/health");
    assert!(
        health.contains("unavailable") && health.contains("keeps failing"),
        "{health}"
    );
    let prompt = "tell me";
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 64}),
    );
    assert_eq!(r.status, 200, "{}\n{}", r.json, s.log());
    assert_eq!(reply_text(&r.json), expected(verify, prompt, 64).0);
    amusd_e2e::wait_until("/health to say 200", READY, || s.get("/health").0 == 200);
    let log = s.terminate(EXIT);
    assert!(log.contains("starting the verify worker again"), "{log}");
}

#[test]
fn bad_input_is_refused_and_sigterm_mid_stream_exits_cleanly() {
    let verify = "fake:vocab=512,seed=2,us=2000,ctx=256";
    let draft = "fake:vocab=512,seed=2,us=1000";
    let s = serve(verify, draft, &["--max-body-bytes", "2000"]);
    let long_prompt = "x".repeat(300);
    let cases = [
        ("/v1/chat/completions", "{\"messages\": [".to_string(), 400),
        (
            "/v1/chat/completions",
            r#"{"messages": []}"#.to_string(),
            400,
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "n": 17}"#.to_string(),
            400,
        ),
        (
            "/v1/completions",
            format!(r#"{{"prompt": "{long_prompt}"}}"#),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 1000000}"#.to_string(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 0}"#.to_string(),
            400,
        ),
        (
            "/v1/completions",
            r#"{"prompt": "x", "temperature": "warm"}"#.to_string(),
            400,
        ),
        (
            "/v1/completions",
            format!(r#"{{"prompt": "{}"}}"#, "y".repeat(3000)),
            413,
        ),
        ("/v1/nowhere", "{}".to_string(), 404),
    ];
    for (path, body, status) in cases {
        let r = s.post_raw(path, &body);
        assert_eq!(r.status, status, "{path} {body:.60}: {}", r.json);
        let msg = r.json["error"]["message"].as_str().unwrap_or_default();
        assert!(!msg.is_empty(), "{}", r.json);
    }
    // Still serving, then SIGTERM while a stream runs: the process exits 0, region removed.
    let r = s.post("/v1/completions", &json!({"prompt": "ok", "max_tokens": 4}));
    assert_eq!(reply_text(&r.json), expected(verify, "ok", 4).0);
    let mut stream = s.stream(
        "/v1/completions",
        &json!({"prompt": "go", "max_tokens": 200, "stream": true}),
    );
    stream.next_data().expect("a first chunk");
    let started = Instant::now();
    let log = s.terminate(EXIT);
    while stream.next_data().is_some() {}
    assert!(
        log.contains("shut down"),
        "{log} after {:?}",
        started.elapsed()
    );
}

/// `--api-key` (comma-separated) and `--api-key-file` keys all open the API; without one, or
/// with another, a request gets a 401 and generates nothing; `/health` answers anyway (the
/// server's start waited on it).
#[test]
fn api_keys_from_the_flag_and_a_file_guard_every_route_but_health() {
    let verify = "fake:vocab=512,seed=2,us=200";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "# team keys\nsk-file\n\n").unwrap();
    let s = serve(
        verify,
        "fake:vocab=512,seed=2,us=100",
        &[
            "--api-key",
            "k1,k2",
            "--api-key-file",
            file.to_str().unwrap(),
        ],
    );
    assert!(s.log().contains("3 API key(s)"), "{}", s.log());
    let body = r#"{"prompt": "ok", "max_tokens": 4}"#;
    for key in ["k1", "k2", "sk-file"] {
        let auth = format!("Bearer {key}");
        let r = s.post_with("/v1/completions", body, &[("Authorization", &auth)]);
        assert_eq!(r.status, 200, "{key}: {}", r.json);
        assert_eq!(reply_text(&r.json), expected(verify, "ok", 4).0);
    }
    let before = s.metric("amusd_completion_tokens_total");
    for headers in [
        vec![],
        vec![("Authorization", "Bearer k3")],
        vec![("X-Api-Key", "k")],
    ] {
        let r = s.post_with("/v1/completions", body, &headers);
        assert_eq!(r.status, 401, "{headers:?}: {}", r.json);
        assert_eq!(r.json["error"]["code"], "invalid_api_key");
    }
    assert_eq!(s.metric("amusd_completion_tokens_total"), before);
    // The request log: a line per generated answer (none for the refused ones).
    let log = s.log();
    let done: Vec<&str> = log.lines().filter(|l| l.contains("request done")).collect();
    assert_eq!(done.len(), 3, "{log}");
    assert!(
        done[0].contains(r#"id="cmpl-"#) && done[0].contains("completion_tokens=4"),
        "{log}"
    );
    assert_eq!(s.get("/v1/models").0, 401);
    assert_eq!(s.get("/health").0, 200);
    s.terminate(EXIT);
    let missing = dir.path().join("none");
    for (key_args, says) in [
        (vec!["--api-key", ""], "empty"),
        (vec!["--api-key", "a b"], "whitespace"),
        (
            vec!["--api-key-file", missing.to_str().unwrap()],
            "cannot read",
        ),
    ] {
        let mut args = vec!["serve", "--port", "0", "--verify-model", verify];
        args.extend(key_args);
        let run = amusd_e2e::amusd_run(&args, EXIT);
        assert!(
            run.status.code().is_some_and(|c| c != 0) && run.stderr.contains(says),
            "{args:?}: {}",
            run.describe()
        );
    }
}
