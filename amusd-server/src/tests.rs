//! The server against a fake generator: no model, no network (requests go straight to the router).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::generator::*;
use crate::{Limits, Server};

/// ASCII text, one token per byte.
struct FakeCodec;

impl Codec for FakeCodec {
    fn model_id(&self) -> &str {
        "fake"
    }
    fn context_length(&self) -> usize {
        64
    }
    fn vocab_size(&self) -> usize {
        128
    }
    fn encode_chat(
        &self,
        messages: &[ChatMessage],
        options: &ChatOptions,
    ) -> Result<Vec<u32>, String> {
        self.encode_prompt(&self.render_chat(messages, options)?)
    }
    /// `role:content` lines; a new turn opens with `>`, a continued one does not close.
    fn render_chat(
        &self,
        messages: &[ChatMessage],
        options: &ChatOptions,
    ) -> Result<String, String> {
        let mut text: String = messages
            .iter()
            .map(|m| format!("{}:{}\n", m.role, m.content))
            .collect();
        match (
            options.continue_final_message,
            options.add_generation_prompt,
        ) {
            (true, _) => {
                text.pop();
            }
            (false, true) => text.push('>'),
            (false, false) => {}
        }
        Ok(text)
    }
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, String> {
        // Its "special token": 1 first.
        let mut ids: Vec<u32> = add_special.then_some(1).into_iter().collect();
        ids.extend(self.encode_prompt(text)?);
        Ok(ids)
    }
    fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>, String> {
        if !prompt.is_ascii() {
            return Err("the fake codec takes ASCII only".into());
        }
        Ok(prompt.bytes().map(u32::from).collect())
    }
    fn text_stream(&self) -> Box<dyn TextStream + '_> {
        struct Ascii;
        impl TextStream for Ascii {
            fn push(&mut self, id: u32) -> String {
                char::from_u32(id).map(String::from).unwrap_or_default()
            }
            fn finish(&mut self) -> String {
                String::new()
            }
        }
        Box::new(Ascii)
    }
    fn token_text(&self, id: u32) -> String {
        char::from_u32(id).map(String::from).unwrap_or_default()
    }
}

/// Hooks into the fake generator's run, for the tests to act at known moments.
#[derive(Default)]
pub(crate) struct Hooks {
    /// Told when a request starts.
    started: Option<mpsc::Sender<()>>,
    /// Waited on before generating each request.
    gate: Option<mpsc::Receiver<()>>,
    /// Told when a request saw its cancellation.
    cancelled: Option<mpsc::Sender<()>>,
    token_delay: Duration,
}

/// Lowercase letters from the prompt's sum; the seed, when sampling, shifts them.
struct FakeGen(Arc<Mutex<Hooks>>);

impl Generator for FakeGen {
    fn generate(
        &mut self,
        req: &GenRequest,
        on_tokens: &mut dyn FnMut(&[u32], &[TokenLogprobs]),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<GenStats, GenError> {
        let h = self.0.lock().unwrap();
        if let Some(s) = &h.started {
            let _ = s.send(());
        }
        if let Some(g) = &h.gate {
            let _ = g.recv();
        }
        let base: u32 = req.prompt.iter().sum::<u32>() + req.sampling.seed.unwrap_or(0) as u32;
        for i in 0..req.max_tokens as u32 {
            if cancelled() {
                if let Some(c) = &h.cancelled {
                    let _ = c.send(());
                }
                break;
            }
            let token = u32::from(b'a') + (base + i * 7) % 26;
            // The token's, and its neighbours' below it.
            let logprobs = req.sampling.logprobs.map(|k| {
                let lp = -0.25 * (i % 4) as f32;
                let top = (0..k as u32).map(|j| (token + j, lp - j as f32)).collect();
                TokenLogprobs {
                    token,
                    logprob: lp,
                    top,
                }
            });
            on_tokens(&[token], logprobs.as_slice());
            // Simulated compute, so a request lasts long enough to be cancelled.
            std::thread::sleep(h.token_delay);
        }
        // Prompt token `p`'s log-probability is -p/100, its alternatives none.
        let prompt_logprobs = match (req.sampling.prompt_logprobs, req.sampling.logprobs) {
            (true, Some(_)) => (req.prompt[1..].iter())
                .map(|&p| TokenLogprobs {
                    token: p,
                    logprob: -(p as f32) / 100.0,
                    top: Vec::new(),
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(GenStats {
            draft_n: 3,
            draft_n_accepted: 2,
            prompt_logprobs,
            ..Default::default()
        })
    }
}

pub(crate) fn fake_server(hooks: Hooks, queue: usize) -> Server {
    server(hooks, queue)
}

fn server(hooks: Hooks, queue: usize) -> Server {
    let hooks = Arc::new(Mutex::new(hooks));
    let factory: GeneratorFactory = Box::new(move || Ok(Box::new(FakeGen(hooks)) as _));
    let limits = Limits {
        max_body_bytes: 4096,
        request_timeout: None,
        retry_after_s: 3,
        api_keys: Default::default(),
        stored_responses: 8,
    };
    Server::start(Arc::new(FakeCodec), factory, queue, limits).unwrap()
}

fn post(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn call(s: &Server, req: Request<Body>) -> (StatusCode, String, axum::http::HeaderMap) {
    let resp = s.router.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        String::from_utf8(bytes.to_vec()).unwrap(),
        parts.headers,
    )
}

async fn json_call(s: &Server, path: &str, body: &str) -> (StatusCode, Value) {
    let (status, text, _) = call(s, post(path, body)).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(String::from)
        .collect()
}

/// The text of a streamed response, and its chunks.
fn streamed_text(body: &str, chat: bool) -> (String, Vec<Value>) {
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text = chunks
        .iter()
        .filter_map(|c| {
            let choice = &c["choices"][0];
            if chat {
                choice["delta"]["content"].as_str()
            } else {
                choice["text"].as_str()
            }
        })
        .collect();
    (text, chunks)
}

const CHAT: &str = "/v1/chat/completions";

#[tokio::test(flavor = "multi_thread")]
async fn streamed_and_whole_responses_agree_with_stop_strings() {
    let s = server(Hooks::default(), 4);
    let body = |stream: bool, stop: &str| {
        json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 20,
               "stream": stream, "stop": stop, "stream_options": {"include_usage": true}})
        .to_string()
    };
    // No stop string first: the whole budget.
    let (status, whole) = json_call(&s, CHAT, &body(false, "")).await;
    assert_eq!(status, 200, "{whole}");
    let full = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(full.len(), 20);
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 20);
    assert_eq!(whole["timings"]["draft_n_accepted"], 2);
    // A stop string from the middle of that text: both forms cut before it.
    let stop = &full[7..9];
    let cut = &full[..full.find(stop).unwrap()];
    let (_, whole) = json_call(&s, CHAT, &body(false, stop)).await;
    assert_eq!(whole["choices"][0]["message"]["content"], cut);
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    let (status, text, headers) = call(&s, post(CHAT, &body(true, stop))).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    let (streamed, chunks) = streamed_text(&text, true);
    assert_eq!(streamed, cut);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"]["prompt_tokens"],
        whole["usage"]["prompt_tokens"]
    );
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn completions_stream_and_seeds() {
    let s = server(Hooks::default(), 4);
    let req = |stream: bool, seed: u64| {
        json!({"prompt": "abc", "max_tokens": 9, "stream": stream, "temperature": 0.8,
               "seed": seed})
        .to_string()
    };
    let (_, whole) = json_call(&s, "/v1/completions", &req(false, 5)).await;
    assert_eq!(whole["object"], "text_completion");
    let text = whole["choices"][0]["text"].as_str().unwrap();
    let (_, again) = json_call(&s, "/v1/completions", &req(false, 5)).await;
    assert_eq!(again["choices"][0]["text"], text, "same seed, same text");
    let (_, other) = json_call(&s, "/v1/completions", &req(false, 6)).await;
    assert_ne!(other["choices"][0]["text"], text);
    let (_, body, _) = call(&s, post("/v1/completions", &req(true, 5))).await;
    assert_eq!(streamed_text(&body, false).0, text);
}

/// `n` choices run one after another: a seeded request's choice `i` is the one-choice answer
/// with seed + `i`; streamed, each chunk carries its choice's index, every chat choice opens with
/// the role and ends with its finish reason, and the texts are the whole response's; the usage
/// counts the prompt once.
#[tokio::test(flavor = "multi_thread")]
async fn n_choices_are_the_seeds_in_turn_streamed_or_whole() {
    let s = server(Hooks::default(), 4);
    let req = |n: usize, seed: u64, stream: bool| {
        json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "n": n,
               "temperature": 0.8, "seed": seed, "stream": stream,
               "stream_options": {"include_usage": true}})
        .to_string()
    };
    let (status, whole) = json_call(&s, CHAT, &req(3, 40, false)).await;
    assert_eq!(status, 200, "{whole}");
    let choices = whole["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let mut texts = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let (_, alone) = json_call(&s, CHAT, &req(1, 40 + i as u64, false)).await;
        assert_eq!(c["message"], alone["choices"][0]["message"], "choice {i}");
        texts.push(c["message"]["content"].as_str().unwrap().to_string());
    }
    assert_ne!(texts[0], texts[1]);
    assert_eq!(whole["usage"]["completion_tokens"], 18);
    let (_, one) = json_call(&s, CHAT, &req(1, 40, false)).await;
    assert_eq!(
        whole["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    let (_, body, _) = call(&s, post(CHAT, &req(3, 40, true))).await;
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let mut streamed = vec![String::new(); 3];
    let (mut roles, mut finishes) = (vec![0; 3], vec![0; 3]);
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        let Some(c) = chunk["choices"].get(0) else {
            assert_eq!(chunk["usage"]["completion_tokens"], 18, "{chunk}");
            continue;
        };
        let i = c["index"].as_u64().unwrap() as usize;
        streamed[i] += c["delta"]["content"].as_str().unwrap_or("");
        roles[i] += usize::from(c["delta"]["role"] == "assistant");
        finishes[i] += usize::from(!c["finish_reason"].is_null());
    }
    assert_eq!(streamed, texts);
    assert_eq!((roles, finishes), (vec![1; 3], vec![1; 3]));
}

/// Completions' `echo`: the text starts with the prompt's; with `logprobs`, the lists start with
/// the prompt's tokens (the first with no log-probability), the offsets running over both. Not
/// on chat; streamed, not with logprobs.
#[tokio::test(flavor = "multi_thread")]
async fn echo_repeats_the_prompt_and_its_logprobs() {
    let s = server(Hooks::default(), 4);
    let body = |extra: &str| format!(r#"{{"prompt":"abc","max_tokens":2{extra}}}"#);
    let (status, plain) = json_call(&s, "/v1/completions", &body("")).await;
    assert_eq!(status, 200, "{plain}");
    let generated = plain["choices"][0]["text"].as_str().unwrap().to_string();
    let (status, v) = json_call(&s, "/v1/completions", &body(r#","echo":true"#)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["text"], format!("abc{generated}"));
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
    let (status, v) = json_call(&s, "/v1/completions", &body(r#","echo":true,"logprobs":1"#)).await;
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = (lp["tokens"].as_array().unwrap().iter())
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), format!("abc{generated}"));
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    let f32_at = |i: usize| lp["token_logprobs"][i].as_f64().unwrap() as f32;
    assert_eq!(
        (f32_at(1), f32_at(2)),
        (-0.98, -0.99),
        "b is 98, c 99: {lp}"
    );
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["text_offset"], json!([0, 1, 2, 3, 4]));
    // Streamed: each choice opens with the prompt's text.
    let (status, text, _) = call(
        &s,
        post(
            "/v1/completions",
            &body(r#","echo":true,"stream":true,"n":2"#),
        ),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (streamed, chunks) = streamed_text(&text, false);
    assert_eq!(chunks[0]["choices"][0]["text"], "abc");
    let second = (chunks.iter())
        .position(|c| c["choices"][0]["index"] == 1)
        .unwrap();
    assert_eq!(chunks[second]["choices"][0]["text"], "abc");
    assert!(
        streamed.starts_with(&format!("abc{generated}")),
        "{streamed}"
    );
    for (body, path) in [
        (
            r#"{"prompt":"abc","echo":true,"stream":true,"logprobs":0}"#,
            "/v1/completions",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"echo":true}"#,
            CHAT,
        ),
    ] {
        let (status, v) = json_call(&s, path, body).await;
        assert_eq!(
            (status.as_u16(), &v["error"]["param"]),
            (400, &json!("echo")),
            "{v}"
        );
    }
}

/// Log-probabilities in OpenAI's shapes: chat's `content` list (token, logprob, bytes,
/// top_logprobs), completions' parallel lists; one per counted token (a stop string's cut
/// included), the same streamed (in each choice's last chunk) as whole.
#[tokio::test(flavor = "multi_thread")]
async fn logprobs_in_both_shapes_streamed_or_whole() {
    let s = server(Hooks::default(), 4);
    let chat = |stream: bool| {
        json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12,
               "logprobs": true, "top_logprobs": 2, "stream": stream})
        .to_string()
    };
    let (status, whole) = json_call(&s, CHAT, &chat(false)).await;
    assert_eq!(status, 200, "{whole}");
    let content = whole["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 12);
    let text: String = content
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(whole["choices"][0]["message"]["content"], text);
    assert_eq!(content[1]["logprob"], -0.25);
    assert_eq!(content[0]["bytes"], json!(text.as_bytes()[..1]));
    let top = content[0]["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!(top[0]["token"], content[0]["token"]);
    assert_eq!(top[1]["logprob"], -1.0);
    let (_, body, _) = call(&s, post(CHAT, &chat(true))).await;
    let (_, chunks) = streamed_text(&body, true);
    let streamed: Vec<Value> = (chunks.iter())
        .filter(|c| (c["choices"][0]["delta"]["content"].as_str()).is_some_and(|t| !t.is_empty()))
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .clone()
        })
        .collect();
    assert_eq!(&streamed, content, "each text chunk carries its tokens'");
    let (_, plain) = json_call(&s, CHAT, &chat(false).replace("true", "false")).await;
    assert!(plain["choices"][0]["logprobs"].is_null());

    let (_, comp) = json_call(
        &s,
        "/v1/completions",
        r#"{"prompt":"abc","max_tokens":5,"logprobs":1}"#,
    )
    .await;
    let lp = &comp["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), comp["choices"][0]["text"]);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["text_offset"], json!([0, 1, 2, 3, 4]));
    assert_eq!(lp["top_logprobs"][0], json!({ tokens[0]: 0.0 }));
    let (_, body, _) = call(
        &s,
        post(
            "/v1/completions",
            r#"{"prompt":"abc","max_tokens":5,"logprobs":1,"stream":true}"#,
        ),
    )
    .await;
    let (_, chunks) = streamed_text(&body, false);
    let offsets: Vec<Value> = (chunks.iter())
        .filter_map(|c| {
            c["choices"][0]["logprobs"]["text_offset"]
                .as_array()
                .cloned()
        })
        .flatten()
        .collect();
    assert_eq!(&offsets, lp["text_offset"].as_array().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_gives_429_with_retry_after() {
    let (started_tx, started) = mpsc::channel();
    let (open, gate) = mpsc::channel();
    let hooks = Hooks {
        started: Some(started_tx),
        gate: Some(gate),
        ..Default::default()
    };
    let s = Arc::new(server(hooks, 2));
    let body = r#"{"prompt":"x","max_tokens":2}"#;
    let spawn = |s: &Arc<Server>| {
        let s = s.clone();
        tokio::spawn(async move { json_call(&s, "/v1/completions", body).await })
    };
    // One running (held at the gate), two queued: the fourth is refused.
    let running = spawn(&s);
    tokio::task::spawn_blocking(move || started.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the first request never started");
    let queued = [spawn(&s), spawn(&s)];
    let mut depth = 0;
    while depth < 2 {
        depth = metric(&s, "amusd_queue_depth ").await;
        tokio::task::yield_now().await;
    }
    let (status, text, headers) = call(&s, post("/v1/completions", body)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{text}");
    assert_eq!(headers["retry-after"], "3");
    assert!(text.contains("rate_limit_exceeded"), "{text}");
    for _ in 0..3 {
        open.send(()).unwrap();
    }
    assert_eq!(running.await.unwrap().0, 200);
    for q in queued {
        assert_eq!(q.await.unwrap().0, 200, "queued requests are all served");
    }
    let text = s.shared.metrics.encode();
    assert!(
        text.contains(r#"amusd_http_requests_total{endpoint="/v1/completions",status="429"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"amusd_http_requests_total{endpoint="/v1/completions",status="200"} 3"#),
        "{text}"
    );
}

/// The value of the first metric line starting with `prefix`.
async fn metric(s: &Server, prefix: &str) -> i64 {
    let (_, text, _) = call(s, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_mid_stream_cancels_its_request() {
    let (cancel_tx, cancelled) = mpsc::channel();
    let hooks = Hooks {
        cancelled: Some(cancel_tx),
        token_delay: Duration::from_millis(5),
        ..Default::default()
    };
    let s = server(hooks, 2);
    let body = r#"{"prompt":"x","max_tokens":60,"stream":true}"#;
    let resp = s
        .router
        .clone()
        .oneshot(post("/v1/completions", body))
        .await
        .unwrap();
    let mut body = resp.into_body();
    // The first chunk arrives, then the client hangs up.
    body.frame().await.unwrap().unwrap();
    drop(body);
    tokio::task::spawn_blocking(move || cancelled.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the generator was not told to stop");
    let (status, v) = json_call(&s, "/v1/completions", r#"{"prompt":"y","max_tokens":3}"#).await;
    assert_eq!(status, 200);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_openai_errors() {
    let s = server(Hooks::default(), 2);
    let long = "x".repeat(70);
    let huge = "y".repeat(5000);
    let cases = [
        (CHAT, "{not json".to_string(), 400, None),
        (
            CHAT,
            r#"{"messages":[]}"#.to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/completions",
            format!(r#"{{"prompt":"{long}"}}"#),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"é"}"#.to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":[1,500]}"#.to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"a","max_tokens":100000}"#.to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"a","max_tokens":0}"#.to_string(),
            400,
            Some("max_tokens"),
        ),
        // A grammar the codec cannot compile (this fake one compiles none): a 400 naming where
        // it came from.
        (
            CHAT,
            r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#
                .to_string(),
            400,
            Some("response_format"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"a","guided_regex":"a+"}"#.to_string(),
            400,
            Some("guided_regex"),
        ),
        (
            "/v1/completions",
            r#"{"prompt":"a","n":17}"#.to_string(),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            format!(r#"{{"prompt":"{huge}"}}"#),
            413,
            None,
        ),
        ("/v1/nothing", "{}".to_string(), 404, None),
    ];
    for (path, body, status, param) in cases {
        let (got, v) = json_call(&s, path, &body).await;
        assert_eq!(got, status, "{path} {body:.80}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert_eq!(v["error"]["param"].as_str(), param, "{v}");
    }
    // The server still answers.
    let (status, _) = json_call(&s, "/v1/completions", r#"{"prompt":"a","max_tokens":1}"#).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_503_until_the_generator_is_loaded() {
    let (open, gate) = mpsc::channel::<()>();
    let factory: GeneratorFactory = Box::new(move || {
        let _ = gate.recv();
        Ok(Box::new(FakeGen(Default::default())) as _)
    });
    let limits = Limits {
        max_body_bytes: 4096,
        request_timeout: None,
        retry_after_s: 1,
        api_keys: Default::default(),
        stored_responses: 8,
    };
    let s = Server::start(Arc::new(FakeCodec), factory, 2, limits).unwrap();
    let health = || Request::get("/health").body(Body::empty()).unwrap();
    assert_eq!(call(&s, health()).await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (_, models, _) = call(&s, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert!(models.contains(r#""id":"fake""#), "{models}");
    assert!(models.contains(r#""max_model_len":64"#), "{models}");
    let (status, props, _) = call(&s, Request::get("/props").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let props: Value = serde_json::from_str(&props).unwrap();
    assert_eq!(props["default_generation_settings"]["n_ctx"], 64);
    assert_eq!(
        (
            props["total_slots"].as_u64(),
            props["chat_template"].as_str()
        ),
        (Some(1), Some(""))
    );
    open.send(()).unwrap();
    // A request queued while loading is served once loading is done.
    let (status, _) = json_call(&s, "/v1/completions", r#"{"prompt":"a","max_tokens":1}"#).await;
    assert_eq!(status, 200);
    assert_eq!(call(&s, health()).await.0, StatusCode::OK);
}

/// A server whose requests time out after 50 ms, generating a token every 5 ms with `hooks`.
fn timing_out(hooks: Hooks) -> Server {
    let hooks = Hooks {
        token_delay: Duration::from_millis(5),
        ..hooks
    };
    let hooks = Arc::new(Mutex::new(hooks));
    let factory: GeneratorFactory = Box::new(move || Ok(Box::new(FakeGen(hooks)) as _));
    let limits = Limits {
        max_body_bytes: 4096,
        request_timeout: Some(Duration::from_millis(50)),
        retry_after_s: 1,
        api_keys: Default::default(),
        stored_responses: 8,
    };
    Server::start(Arc::new(FakeCodec), factory, 2, limits).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_past_its_timeout_is_cancelled_with_504() {
    let (cancel_tx, cancelled) = mpsc::channel();
    let s = timing_out(Hooks {
        cancelled: Some(cancel_tx),
        ..Default::default()
    });
    // 60 tokens of 5 ms each: well past 50 ms.
    let (status, v) = json_call(&s, "/v1/completions", r#"{"prompt":"a","max_tokens":60}"#).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("timeout"),
        "{v}"
    );
    cancelled
        .recv_timeout(Duration::from_secs(30))
        .expect("the generator was not told to stop");
}

/// `/tokenize` in llama.cpp's and vLLM's shapes (special tokens by each one's default), on chat
/// messages too; `/detokenize` back; `/apply-template`'s prompt text; bad bodies are 400s.
#[tokio::test(flavor = "multi_thread")]
async fn tokenize_and_detokenize() {
    let s = server(Hooks::default(), 4);
    let (status, v) = json_call(&s, "/tokenize", r#"{"content": "Hi"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(v["tokens"], json!([72, 105]));
    assert_eq!(
        (v["count"].as_u64(), v["max_model_len"].as_u64()),
        (Some(2), Some(64))
    );
    let (_, v) = json_call(&s, "/tokenize", r#"{"prompt": "Hi"}"#).await;
    assert_eq!(v["tokens"], json!([1, 72, 105]));
    let (_, v) = json_call(
        &s,
        "/tokenize",
        r#"{"content": "Hi", "add_special": true, "with_pieces": true}"#,
    )
    .await;
    assert_eq!(v["tokens"][1], json!({"id": 72, "piece": "H"}));
    let (_, v) = json_call(
        &s,
        "/tokenize",
        r#"{"messages": [{"role": "user", "content": "x"}]}"#,
    )
    .await;
    assert_eq!(v["count"], "user:x\n>".len());
    // llama.cpp's `/apply-template`: the text that chat tokenizes.
    let (status, v) = json_call(
        &s,
        "/apply-template",
        r#"{"messages": [{"role": "user", "content": "x"}]}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["prompt"], "user:x\n>");
    let (status, v) = json_call(&s, "/detokenize", r#"{"tokens": [72, 105]}"#).await;
    assert_eq!(status, 200);
    assert_eq!(
        (v["content"].as_str(), v["prompt"].as_str()),
        (Some("Hi"), Some("Hi"))
    );
    for (path, body, param) in [
        ("/tokenize", r#"{}"#, None),
        ("/tokenize", r#"{"content": "a", "prompt": "b"}"#, None),
        ("/tokenize", r#"{"content": "é"}"#, Some("content")),
        ("/tokenize", r#"{"content": 5}"#, Some("content")),
        ("/detokenize", r#"{"tokens": [72, 999]}"#, Some("tokens")),
        ("/detokenize", r#"{}"#, Some("tokens")),
        ("/detokenize", r#"not json"#, None),
        ("/apply-template", r#"{"messages": []}"#, Some("messages")),
    ] {
        let (status, v) = json_call(&s, path, body).await;
        assert_eq!(status, 400, "{path} {body}: {v}");
        assert_eq!(v["error"]["param"].as_str(), param, "{path} {body}: {v}");
    }
}

/// llama.cpp's own `/completion`: its names in (`n_predict`, `n_probs`, `logit_bias` pairs), its
/// shapes out, whole or streamed (events of `content`, the last with `stop` and the counts, no
/// `[DONE]`); the text is the completion's.
#[tokio::test(flavor = "multi_thread")]
async fn llama_cpp_completion() {
    let s = server(Hooks::default(), 4);
    let (_, openai) = json_call(&s, "/v1/completions", r#"{"prompt":"abc","max_tokens":5}"#).await;
    let text = openai["choices"][0]["text"].as_str().unwrap();
    let (status, v) = json_call(&s, "/completion", r#"{"prompt":"abc","n_predict":5}"#).await;
    assert_eq!(status, 200, "{v}");
    // llama.cpp also reads `max_tokens`; `n_predict` wins.
    let (_, alias) = json_call(&s, "/completion", r#"{"prompt":"abc","max_tokens":5}"#).await;
    assert_eq!(alias["content"], text);
    let both = r#"{"prompt":"abc","max_tokens":2,"n_predict":5}"#;
    assert_eq!(json_call(&s, "/completion", both).await.1["content"], text);
    // Nothing to generate: refused, naming the field the client sent.
    let (status, e) = json_call(&s, "/completion", r#"{"prompt":"abc","n_predict":0}"#).await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("n_predict")),
        "{e}"
    );
    assert_eq!(v["content"], text);
    assert_eq!(
        (v["stop"].as_bool(), v["stop_type"].as_str()),
        (Some(true), Some("limit"))
    );
    assert_eq!(
        (
            v["tokens_predicted"].as_u64(),
            v["tokens_evaluated"].as_u64()
        ),
        (Some(5), Some(3))
    );
    assert!(v["timings"]["predicted_n"].is_number() && v.get("completion_probabilities").is_none());
    let stop = &text[2..3];
    let body = format!(r#"{{"prompt":"abc","n_predict":5,"stop":["{stop}"],"n_probs":2}}"#);
    let (_, v) = json_call(&s, "/completion", &body).await;
    assert_eq!(
        (v["content"].as_str(), v["stop_type"].as_str()),
        (Some(&text[..2]), Some("word"))
    );
    let probs = v["completion_probabilities"].as_array().unwrap();
    assert_eq!(probs[0]["token"], &text[..1]);
    assert_eq!(probs[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let (status, raw, _) = call(
        &s,
        post(
            "/completion",
            r#"{"prompt":"abc","n_predict":5,"stream":true}"#,
        ),
    )
    .await;
    assert_eq!(status, 200);
    let events: Vec<Value> = (sse_data(&raw).iter())
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = (events.iter())
        .filter_map(|e| e["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let last = events.last().unwrap();
    assert_eq!(
        (last["stop"].as_bool(), last["tokens_predicted"].as_u64()),
        (Some(true), Some(5))
    );
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| e["stop"] == false));
    // llama.cpp's pairs are read (`false` bans; the fake generator ignores biases).
    let first = u32::from(text.as_bytes()[0]);
    let body = format!(r#"{{"prompt":"abc","n_predict":5,"logit_bias":[[{first},false]]}}"#);
    let (status, _) = json_call(&s, "/completion", &body).await;
    assert_eq!(status, 200);
    for (body, param) in [
        (r#"{"prompt":"abc","n_predict":-2}"#, "n_predict"),
        (r#"{"prompt":"abc","logit_bias":[["x",1]]}"#, "logit_bias"),
    ] {
        let (status, v) = json_call(&s, "/completion", body).await;
        assert_eq!(
            (status.as_u16(), v["error"]["param"].as_str()),
            (400, Some(param)),
            "{v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_api_keys_only_health_and_metrics_answer_without_one() {
    let factory: GeneratorFactory = Box::new(|| Ok(Box::new(FakeGen(Default::default())) as _));
    let limits = Limits {
        max_body_bytes: 4096,
        request_timeout: None,
        retry_after_s: 1,
        api_keys: crate::ApiKeys::new(vec!["k1".into(), "sk-2".into()]).unwrap(),
        stored_responses: 8,
    };
    let s = Server::start(Arc::new(FakeCodec), factory, 2, limits).unwrap();
    let body = r#"{"prompt":"a","max_tokens":2}"#;
    let with = |name: &str, value: &str| {
        let mut r = post("/v1/completions", body);
        r.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        r
    };
    let (status, text, headers) = call(&s, post("/v1/completions", body)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert_eq!(headers["www-authenticate"], "Bearer");
    let err: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(err["error"]["code"], "invalid_api_key");
    let (status, ..) = call(&s, with("authorization", "Bearer k2")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for (name, value) in [("authorization", "Bearer sk-2"), ("x-api-key", "k1")] {
        let (status, text, _) = call(&s, with(name, value)).await;
        assert_eq!(status, StatusCode::OK, "{name}: {text}");
    }
    // Unknown routes do not tell a keyless client what exists.
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    assert_eq!(
        call(&s, get("/v1/models")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(call(&s, get("/nowhere")).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&s, get("/health")).await.0, StatusCode::OK);
    let (status, metrics, _) = call(&s, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains(r#"endpoint="/v1/completions",status="401"} 2"#),
        "{metrics}"
    );
}

/// The `event:` names and `data:` objects of an SSE body.
fn named_events(body: &str) -> Vec<(String, Value)> {
    let names = body.lines().filter_map(|l| l.strip_prefix("event: "));
    let data = sse_data(body).into_iter();
    names
        .zip(data)
        .map(|(n, d)| (n.to_string(), serde_json::from_str(&d).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_responses_api_whole_and_streamed_says_what_chat_says() {
    let s = server(Hooks::default(), 4);
    let (status, chat) = json_call(
        &s,
        CHAT,
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
            "max_tokens": 12, "logprobs": true, "top_logprobs": 2}"#,
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    let want = chat["choices"][0]["message"]["content"].as_str().unwrap();
    let req = |stream: bool| {
        json!({"model": "fake", "instructions": "Be brief.", "input": "hello",
               "max_output_tokens": 12, "top_logprobs": 2, "stream": stream})
        .to_string()
    };
    let (status, whole) = json_call(&s, "/v1/responses", &req(false)).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "response");
    assert!(
        whole["id"].as_str().unwrap().starts_with("resp_"),
        "{whole}"
    );
    let part = &whole["output"][0]["content"][0];
    assert_eq!(part["text"], want);
    assert_eq!(part["logprobs"], chat["choices"][0]["logprobs"]["content"]);
    assert_eq!(whole["status"], "incomplete");
    assert_eq!(whole["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(
        whole["usage"]["input_tokens"],
        chat["usage"]["prompt_tokens"]
    );
    assert_eq!(whole["usage"]["output_tokens"], 12);
    assert_eq!(whole["max_output_tokens"], 12);

    let (status, body, headers) = call(&s, post("/v1/responses", &req(true))).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    let events = named_events(&body);
    assert!(!body.contains("[DONE]"), "{body}");
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    let deltas = kinds
        .iter()
        .filter(|k| **k == "response.output_text.delta")
        .count();
    assert_eq!(
        kinds[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        kinds[kinds.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete"
        ]
    );
    assert_eq!(kinds.len(), 8 + deltas);
    for (i, (kind, data)) in events.iter().enumerate() {
        assert_eq!(
            (data["type"].as_str(), data["sequence_number"].as_u64()),
            (Some(kind.as_str()), Some(i as u64))
        );
    }
    let text: String = (events.iter())
        .filter_map(|(_, d)| d["delta"].as_str())
        .collect();
    assert_eq!(text, want);
    let last = &events[events.len() - 1].1["response"];
    // The same output but for the ids, which are per response.
    assert_eq!(last["output"][0]["content"], whole["output"][0]["content"]);
    assert_eq!(last["output"].as_array().unwrap().len(), 1);
    assert_eq!(last["usage"], whole["usage"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_errors_name_the_responses_fields() {
    let s = server(Hooks::default(), 4);
    for (body, param) in [
        (
            r#"{"input": "a", "max_output_tokens": 0}"#,
            "max_output_tokens",
        ),
        (
            r#"{"input": "a", "max_output_tokens": 500}"#,
            "max_output_tokens",
        ),
        (r#"{"input": "a", "temperature": "hot"}"#, "temperature"),
        (r#"{"model": "m"}"#, "input"),
        (
            r#"{"input": "a", "text": {"format": {"type": "json_schema", "name": "x", "schema": 3}}}"#,
            "text.format",
        ),
    ] {
        let (status, err) = json_call(&s, "/v1/responses", body).await;
        assert_eq!(status, 400, "{body}: {err}");
        let got = err["error"]["param"].as_str().unwrap();
        assert!(got.starts_with(param), "{body}: {err}");
        assert!(
            !err["error"]["message"]
                .as_str()
                .unwrap()
                .contains("max_tokens"),
            "{err}"
        );
    }
}

/// A GET or DELETE without a body.
fn bodiless(method: &str, path: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .body(Body::empty())
        .unwrap()
}

async fn json_of(s: &Server, method: &str, path: &str) -> (StatusCode, Value) {
    let (status, text, _) = call(s, bodiless(method, path)).await;
    (status, serde_json::from_str(&text).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_response_is_continued_read_back_listed_and_deleted() {
    let s = server(Hooks::default(), 4);
    let (status, first) = json_call(
        &s,
        "/v1/responses",
        r#"{"input": "hello", "max_output_tokens": 4}"#,
    )
    .await;
    assert_eq!(
        (status, &first["store"]),
        (StatusCode::OK, &json!(true)),
        "{first}"
    );
    let id = first["id"].as_str().unwrap();
    assert_eq!(id.len(), "resp_".len() + 32, "{id}");
    assert_eq!(
        json_of(&s, "GET", &format!("/v1/responses/{id}")).await,
        (StatusCode::OK, first.clone())
    );
    let answer = first["output"][0]["content"][0]["text"].as_str().unwrap();

    // Continued, streamed: the prompt is the whole conversation, as chat renders it.
    let next = json!({"previous_response_id": id, "input": "more", "max_output_tokens": 4,
        "stream": true, "instructions": "Be brief."});
    let (status, body, _) = call(&s, post("/v1/responses", &next.to_string())).await;
    assert_eq!(status, StatusCode::OK);
    let events = named_events(&body);
    let second = events.last().unwrap().1["response"].clone();
    assert_eq!(second["previous_response_id"], id);
    let chat = json!({"max_tokens": 4, "messages": [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": answer},
        {"role": "user", "content": "more"}]});
    let (_, chat) = json_call(&s, CHAT, &chat.to_string()).await;
    assert_eq!(
        second["usage"]["input_tokens"],
        chat["usage"]["prompt_tokens"]
    );
    assert_eq!(
        second["output"][0]["content"][0]["text"],
        chat["choices"][0]["message"]["content"]
    );
    let second_id = second["id"].as_str().unwrap();
    let (status, kept) = json_of(&s, "GET", &format!("/v1/responses/{second_id}")).await;
    assert_eq!((status, &kept), (StatusCode::OK, &second));

    // Its input: the first exchange and its own message (not its instructions), newest first.
    let (status, items) =
        json_of(&s, "GET", &format!("/v1/responses/{second_id}/input_items")).await;
    assert_eq!(status, StatusCode::OK, "{items}");
    let data = items["data"].as_array().unwrap();
    let texts: Vec<&Value> = data.iter().map(|i| &i["content"][0]["text"]).collect();
    assert_eq!(texts, [&json!("more"), &json!(answer), &json!("hello")]);
    assert_eq!(data.len(), 3);
    assert!(
        data.iter()
            .all(|i| i["id"].is_string() && i["type"] == "message"),
        "{items}"
    );
    let (status, one) = json_of(
        &s,
        "GET",
        &format!("/v1/responses/{second_id}/input_items?order=asc&limit=1"),
    )
    .await;
    assert_eq!(
        (
            status,
            &one["data"][0]["content"][0]["text"],
            &one["has_more"]
        ),
        (StatusCode::OK, &json!("hello"), &json!(true))
    );

    // Deleted: gone, and nothing can continue it.
    let (status, deleted) = json_of(&s, "DELETE", &format!("/v1/responses/{id}")).await;
    assert_eq!(
        (status, deleted),
        (
            StatusCode::OK,
            json!({"id": id, "object": "response", "deleted": true})
        )
    );
    for method in ["GET", "DELETE"] {
        let (status, e) = json_of(&s, method, &format!("/v1/responses/{id}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{e}");
    }
    let again = json!({"previous_response_id": id, "input": "x"}).to_string();
    let (status, e) = json_call(&s, "/v1/responses", &again).await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (StatusCode::NOT_FOUND, Some("previous_response_id"))
    );

    // store: false keeps nothing.
    let (_, unkept) = json_call(
        &s,
        "/v1/responses",
        r#"{"input": "a", "max_output_tokens": 1, "store": false}"#,
    )
    .await;
    assert_eq!(unkept["store"], false);
    let (status, _) = json_of(
        &s,
        "GET",
        &format!("/v1/responses/{}", unkept["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A conversation that ends with an assistant's text is continued unless the request asks for a
/// new turn (the fake codec opens a turn with `>` and ends each message with a newline).
#[tokio::test(flavor = "multi_thread")]
async fn a_final_assistant_message_is_continued_unless_a_new_turn_is_asked_for() {
    let s = server(Hooks::default(), 4);
    let tokenized = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Th"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let s = &s;
        async move {
            let (status, v) = json_call(s, "/tokenize", &body.to_string()).await;
            let text: String = (v["tokens"].as_array().into_iter().flatten())
                .map(|t| char::from(t.as_u64().unwrap() as u8))
                .collect();
            (status, text, v)
        }
    };
    assert_eq!(tokenized(json!({})).await.1, "user:hi\nassistant:Th");
    let closed = "user:hi\nassistant:Th\n>";
    assert_eq!(
        tokenized(json!({"add_generation_prompt": true})).await.1,
        closed
    );
    assert_eq!(
        tokenized(json!({"continue_final_message": false})).await.1,
        closed
    );
    for (extra, param) in [
        (
            json!({"add_generation_prompt": true, "continue_final_message": true}),
            "continue_final_message",
        ),
        (json!({"chat_template_kwargs": [1]}), "chat_template_kwargs"),
    ] {
        let (status, _, v) = tokenized(extra).await;
        assert_eq!(
            (status, v["error"]["param"].as_str()),
            (StatusCode::BAD_REQUEST, Some(param)),
            "{v}"
        );
    }
    // The chat endpoint renders alike: continued, the prompt is 2 tokens shorter.
    let body = |extra: &str| {
        format!(
            r#"{{"messages": [{{"role": "user", "content": "hi"}},
        {{"role": "assistant", "content": "Th"}}], "max_tokens": 1{extra}}}"#
        )
    };
    let (_, cont) = json_call(&s, CHAT, &body("")).await;
    let (_, turn) = json_call(&s, CHAT, &body(r#", "add_generation_prompt": true"#)).await;
    assert_eq!(
        cont["usage"]["prompt_tokens"].as_u64().unwrap() + 2,
        turn["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    let (status, v) = json_call(
        &s,
        CHAT,
        r#"{"messages": [{"role": "user", "content": "hi"}], "continue_final_message": true}"#,
    )
    .await;
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("continue_final_message")),
        "{v}"
    );
}

/// A known endpoint asked with a method it does not take is a 405 with an error object, as an
/// unknown path is a 404 with one.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_method_is_a_405_that_says_so() {
    let s = server(Hooks::default(), 2);
    let cases = [
        ("GET", "/v1/chat/completions"),
        ("PUT", "/v1/completions"),
        ("POST", "/health"),
        ("POST", "/v1/models"),
    ];
    for (method, path) in cases {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty());
        let (status, text, _) = call(&s, req.unwrap()).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(path) && message.contains(method), "{v}");
    }
}

/// `GET /v1/models/{id}` (the clients' `models.retrieve`): the served model's object, as the list
/// has it; another id is a 404 with OpenAI's code `model_not_found`.
#[tokio::test(flavor = "multi_thread")]
async fn a_model_is_retrieved_by_its_id() {
    let s = server(Hooks::default(), 2);
    let (status, list) = json_of(&s, "GET", "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    let (status, one) = json_of(&s, "GET", "/v1/models/fake").await;
    assert_eq!((status, &one), (StatusCode::OK, &list["data"][0]), "{one}");
    assert_eq!(one["object"], "model");
    for other in ["/v1/models/gpt-4o", "/v1/models/org/fake"] {
        let (status, e) = json_of(&s, "GET", other).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{other}: {e}");
        assert_eq!(e["error"]["code"], "model_not_found", "{other}: {e}");
        assert_eq!(e["error"]["type"], "not_found_error", "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains("fake"),
            "{e}"
        );
    }
}

/// A prompt that does not fit the context, or a max_tokens past what it leaves, is a 400 with
/// OpenAI's code `context_length_exceeded` on every endpoint that generates (clients such as
/// langchain-openai tell an overflow by that code alone).
#[tokio::test(flavor = "multi_thread")]
async fn a_context_overflow_says_context_length_exceeded_everywhere() {
    let s = server(Hooks::default(), 2);
    let long = "x".repeat(70);
    let cases = [
        (
            CHAT,
            json!({"messages": [{"role": "user", "content": long}]}),
            "messages",
        ),
        ("/v1/completions", json!({"prompt": long}), "prompt"),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 64}),
            "max_tokens",
        ),
        ("/completion", json!({"prompt": long}), "prompt"),
        ("/v1/responses", json!({"input": long}), "input"),
        (
            "/v1/responses",
            json!({"input": "a", "max_output_tokens": 64}),
            "max_output_tokens",
        ),
    ];
    for (path, body, param) in cases {
        let (status, e) = json_call(&s, path, &body.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {e}");
        assert_eq!(
            (e["error"]["code"].as_str(), e["error"]["param"].as_str()),
            (Some("context_length_exceeded"), Some(param)),
            "{path}: {e}"
        );
    }
    // Other bad input keeps no code.
    let (_, e) = json_call(&s, "/v1/completions", r#"{"prompt":"a","max_tokens":0}"#).await;
    assert!(e["error"]["code"].is_null(), "{e}");
}

/// lm-eval-harness's log-likelihood request: the prompt as a list of one token-id list, echoed
/// with its log-probabilities; the same answer as the text prompt's.
#[tokio::test(flavor = "multi_thread")]
async fn a_list_of_one_token_list_is_a_prompt() {
    let s = server(Hooks::default(), 2);
    let body = |prompt: Value| {
        json!({"prompt": prompt, "max_tokens": 1, "echo": true, "logprobs": 1,
            "temperature": 0})
        .to_string()
    };
    let (status, ids) = json_call(&s, "/v1/completions", &body(json!([[97, 98, 99]]))).await;
    assert_eq!(status, StatusCode::OK, "{ids}");
    let (_, text) = json_call(&s, "/v1/completions", &body(json!("abc"))).await;
    assert_eq!(ids["choices"], text["choices"]);
    assert!(ids["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("abc"));
    assert_eq!(ids["choices"][0]["logprobs"]["tokens"][0], "a");
    assert_eq!(ids["usage"]["prompt_tokens"], 3);
}

/// `max_tokens: 0` with `echo` scores the prompt (legacy OpenAI's way, lm-eval-harness's for
/// log-likelihoods): the prompt's text and log-probabilities, nothing generated, those of a
/// request that generates one token up to its last; streamed, or without echo, still a 400.
#[tokio::test(flavor = "multi_thread")]
async fn max_tokens_0_with_echo_scores_the_prompt() {
    let s = server(Hooks::default(), 4);
    let body = |max: u32, extra: Value| {
        let mut b = json!({"prompt": [[97, 98, 99]], "max_tokens": max, "echo": true,
            "logprobs": 2, "temperature": 0});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b.to_string()
    };
    let (status, scored) = json_call(&s, "/v1/completions", &body(0, json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{scored}");
    let choice = &scored["choices"][0];
    assert_eq!(choice["text"], "abc", "{scored}");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(scored["usage"]["completion_tokens"], 0);
    assert_eq!(scored["usage"]["total_tokens"], 3);
    let (_, one) = json_call(&s, "/v1/completions", &body(1, json!({}))).await;
    let lp = |v: &Value, key: &str| v["choices"][0]["logprobs"][key].as_array().unwrap().clone();
    for key in ["tokens", "token_logprobs", "top_logprobs"] {
        assert_eq!(lp(&scored, key).len(), 3, "{key}: {scored}");
        assert_eq!(lp(&scored, key)[..], lp(&one, key)[..3], "{key}");
    }
    for refused in [
        json!({"stream": true, "logprobs": null}),
        json!({"echo": false}),
    ] {
        let (status, e) = json_call(&s, "/v1/completions", &body(0, refused)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
        assert_eq!(e["error"]["param"], "max_tokens", "{e}");
    }
}

/// `GET /v1/responses/{id}/input_items` lists messages in OpenAI's shape whatever shape the
/// client sent them in: content as `input_text` parts (an assistant's `output_text`), a status;
/// and a request continuing the response reads them back as the items sent gave.
#[tokio::test(flavor = "multi_thread")]
async fn input_items_are_listed_as_typed_parts_with_a_status() {
    let s = server(Hooks::default(), 4);
    let input = json!([
        {"role": "developer", "content": "Hi"},
        {"type": "message", "role": "user", "content": [{"type": "text", "text": "a"}]},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "input_text", "text": "c"}]},
    ]);
    let body = json!({"input": input, "max_output_tokens": 2}).to_string();
    let (status, first) = json_call(&s, "/v1/responses", &body).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let id = first["id"].as_str().unwrap();
    let path = format!("/v1/responses/{id}/input_items?order=asc");
    let (status, items) = json_of(&s, "GET", &path).await;
    assert_eq!(status, StatusCode::OK, "{items}");
    let data = items["data"].as_array().unwrap();
    assert!(
        data.iter()
            .all(|i| i["status"] == "completed" && i["type"] == "message"),
        "{items}"
    );
    let parts: Vec<&Value> = data.iter().map(|i| &i["content"]).collect();
    let input_text = |t: &str| json!([{"type": "input_text", "text": t}]);
    assert_eq!(
        parts,
        [
            &input_text("Hi"),
            &input_text("a"),
            &json!([{"type": "output_text", "text": "b", "annotations": []}]),
            &input_text("c"),
        ]
    );
    // Continued, the kept items make the prompt the items as sent made.
    let next = json!({"previous_response_id": id, "input": "d", "max_output_tokens": 2});
    let (_, next) = json_call(&s, "/v1/responses", &next.to_string()).await;
    let mut whole = input.as_array().unwrap().clone();
    let answer = &first["output"][0]["content"][0]["text"];
    whole.push(json!({"role": "assistant", "content": answer}));
    whole.push(json!({"role": "user", "content": "d"}));
    let again = json!({"input": whole, "max_output_tokens": 2, "store": false});
    let (_, again) = json_call(&s, "/v1/responses", &again.to_string()).await;
    assert_eq!(
        next["usage"]["input_tokens"],
        again["usage"]["input_tokens"]
    );
    assert_eq!(next["output"][0]["content"], again["output"][0]["content"]);
}

/// llama.cpp's `return_tokens`: the generated ids in `tokens`, whole (all of them, as many as
/// `tokens_predicted`) or streamed (each chunk its text's, the last event none); without it
/// `tokens` is empty, as llama.cpp's. The fake codec's ids are its text's bytes.
#[tokio::test(flavor = "multi_thread")]
async fn llama_cpp_return_tokens() {
    let s = server(Hooks::default(), 4);
    let ids = |v: &Value| -> Vec<u8> {
        (v["tokens"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter())
        .map(|t| t.as_u64().unwrap() as u8)
        .collect()
    };
    let body = r#"{"prompt":"abc","n_predict":5,"return_tokens":true}"#;
    let (status, v) = json_call(&s, "/completion", body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let text = v["content"].as_str().unwrap();
    assert_eq!(ids(&v), text.as_bytes());
    assert_eq!(v["tokens_predicted"], 5);
    let (_, plain) = json_call(&s, "/completion", r#"{"prompt":"abc","n_predict":5}"#).await;
    assert_eq!(plain["tokens"], json!([]));
    // A stop string: every token counted, the stop string's included.
    let stop = format!(
        r#"{{"prompt":"abc","n_predict":5,"return_tokens":true,"stop":["{}"]}}"#,
        &text[2..3]
    );
    let (_, cut) = json_call(&s, "/completion", &stop).await;
    assert_eq!(ids(&cut), &text.as_bytes()[..3], "{cut}");
    assert_eq!(cut["tokens_predicted"], 3);

    let streamed = r#"{"prompt":"abc","n_predict":5,"return_tokens":true,"stream":true}"#;
    let (_, raw, _) = call(&s, post("/completion", streamed)).await;
    let events: Vec<Value> = (sse_data(&raw).iter())
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, chunks) = events.split_last().unwrap();
    for c in chunks {
        assert_eq!(ids(c), c["content"].as_str().unwrap().as_bytes(), "{c}");
    }
    assert_eq!(
        chunks.iter().flat_map(ids).collect::<Vec<u8>>(),
        text.as_bytes()
    );
    assert_eq!(last["tokens"], json!([]), "{last}");
}

/// A Responses stream's events say their name before their data (`event:` then `data:`), as
/// OpenAI's do.
#[tokio::test(flavor = "multi_thread")]
async fn responses_events_name_themselves_before_their_data() {
    let s = server(Hooks::default(), 2);
    let body = r#"{"input": "hello", "max_output_tokens": 3, "stream": true}"#;
    let (status, raw, _) = call(&s, post("/v1/responses", body)).await;
    assert_eq!(status, StatusCode::OK);
    let events: Vec<&str> = raw.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.len() >= 8, "{raw}");
    for e in events {
        let lines: Vec<&str> = e.lines().collect();
        assert!(
            lines.len() == 2 && lines[0].starts_with("event: ") && lines[1].starts_with("data: "),
            "{e:?}"
        );
        let name = &lines[0]["event: ".len()..];
        let data: Value = serde_json::from_str(&lines[1]["data: ".len()..]).unwrap();
        assert_eq!(data["type"], name);
    }
}

/// What the request log reads of a response ([`crate::error::Unlogged`], which `log_errors` logs
/// once at WARN with the method, path and status), or `None`.
async fn logged(s: &Server, req: Request<Body>) -> (StatusCode, Option<String>) {
    let resp = s.router.clone().oneshot(req).await.unwrap();
    let said = resp.extensions().get::<crate::error::Unlogged>();
    (resp.status(), said.map(|u| u.0.clone()))
}

/// Each refused request reaches the request log with its error; a request served does not, nor
/// one whose generation failed (the decode thread logged it, with the request's id). Read off the
/// responses, not a subscriber: tracing caches which lines anyone listens to process-wide, and
/// with other tests' threads hitting the same line a scoped subscriber here missed events (CI,
/// one run in 25 here).
#[tokio::test(flavor = "multi_thread")]
async fn refused_requests_reach_the_request_log_once() {
    let s = server(Hooks::default(), 2);
    let (status, said) = logged(&s, post(CHAT, "{not json")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(said.is_some_and(|m| m.contains("not valid JSON")));
    let unknown = Request::get("/v1/nowhere").body(Body::empty()).unwrap();
    let (status, said) = logged(&s, unknown).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(said.is_some_and(|m| m.contains("no such endpoint")));
    let fine = post("/v1/completions", r#"{"prompt":"a","max_tokens":1}"#);
    assert_eq!(logged(&s, fine).await, (StatusCode::OK, None));
    // Past its timeout: the decode thread's line, none here.
    let slow = timing_out(Hooks::default());
    let late = post("/v1/completions", r#"{"prompt":"a","max_tokens":60}"#);
    assert_eq!(
        logged(&slow, late).await,
        (StatusCode::GATEWAY_TIMEOUT, None)
    );
}
