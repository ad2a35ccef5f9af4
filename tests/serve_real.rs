//! `amusd serve` on the real model (SmolLM2-135M-Instruct, the worker pair): chat and completions,
//! streamed and not, and without prompt lookup (`"prompt_lookup": false`), equal `amusd generate
//! --strategy ar`; a repeated prompt and a follow-up turn find their prefix cached, and answer as
//! they do without the cache (`"cache_prompt": false`); a seeded sampled request equals ar's
//! sample, and a request with repetition penalties or a logit bias ar's text under the same
//! options (a token outside the vocabulary: a 400 naming `logit_bias`), and one asking for
//! log-probabilities ar's numbers; and the official `openai`
//! Python client (pinned, in a venv under target/) checks the same
//! through its own parsing, plus `/metrics` through the Prometheus parser; chat templates with a
//! tool syntax of their own (`tests/templates/`) get tool calls in it. Kept short: a few requests
//! of 24 to 40 tokens.

// Shared with tests/serve.rs; not every helper is used here.
#[allow(dead_code)]
mod serve_common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use amusd_e2e::{amusd_run, require_default_model};
use serde_json::json;
use serve_common::{reply_text, start, Served};

const MAX: usize = 24;
const CHAT: &str = "What is the capital of France?";
const RAW: &str = "The three primary colors are";
/// A schema whose answers end well within [`STRUCTURED_MAX`] tokens.
const SCHEMA: &str = r#"{"type": "object", "properties": {"country": {"type": "string",
    "maxLength": 12}, "capital": {"type": "string", "maxLength": 12}}, "required": ["country",
    "capital"], "additionalProperties": false}"#;
const STRUCTURED_MAX: usize = 40;

/// `amusd generate --strategy ar --json ARGS...`'s text.
fn ar_text(args: &[&str]) -> String {
    ar_json(args)["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {args:?}'s output"))
        .to_string()
}

/// `amusd generate --strategy ar --json ARGS...`'s output.
fn ar_json(args: &[&str]) -> serde_json::Value {
    ar_json_with(MAX, args)
}

/// [`ar_json`] for up to `max` new tokens.
fn ar_json_with(max: usize, args: &[&str]) -> serde_json::Value {
    let max = max.to_string();
    let mut all = vec![
        "generate",
        "--strategy",
        "ar",
        "--json",
        "--max-new-tokens",
        &max,
    ];
    all.extend_from_slice(args);
    amusd_run(&all, Duration::from_secs(300)).json()
}

#[test]
fn serve_equals_generate_ar_and_the_openai_client_agrees() {
    require_default_model();
    let chat_ar = ar_text(&["--prompt", CHAT]);
    let raw_ar = ar_text(&["--raw", "--prompt", RAW]);
    let sampled_ar = ar_text(&["--prompt", CHAT, "--temperature", "0.8", "--seed", "7"]);
    let penalties = ["--frequency-penalty", "1.5", "--presence-penalty", "0.5"];
    let penalized_ar = ar_text(&[&["--prompt", CHAT][..], &penalties].concat());
    assert_ne!(penalized_ar, chat_ar, "the penalties changed nothing");
    // A logit bias of -100 on the answer's first token: another answer.
    let first = ar_json(&["--prompt", CHAT])["tokens"][0]
        .as_u64()
        .expect("no tokens in ar's output");
    let ban = format!("{first}-100");
    let biased_ar = ar_text(&["--prompt", CHAT, "--logit-bias", &ban]);
    assert_ne!(biased_ar, chat_ar, "the logit bias changed nothing");
    let logprobs_ar = ar_json(&["--prompt", CHAT, "--logprobs", "2"])["logprobs"].clone();
    let structured_ar = ar_json_with(STRUCTURED_MAX, &["--prompt", CHAT, "--json-schema", SCHEMA])
        ["text"]
        .as_str()
        .unwrap()
        .to_string();
    let structured: serde_json::Value = serde_json::from_str(&structured_ar)
        .unwrap_or_else(|e| panic!("ar's structured answer is not JSON ({e}): {structured_ar}"));
    assert!(structured["capital"].is_string(), "{structured_ar}");
    let echo_ar = ar_json(&[
        "--raw",
        "--prompt",
        RAW,
        "--logprobs",
        "1",
        "--prompt-logprobs",
    ]);
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
    // The same prompt again: every token but the last was cached (and the text is the same).
    let prompt_n = r.json["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = &r.json["usage"]["prompt_tokens_details"]["cached_tokens"];
    assert_eq!(cached.as_u64(), Some(prompt_n - 1), "{}", r.json);
    assert_eq!(r.json["timings"]["cache_n"].as_u64(), Some(prompt_n - 1));
    // A follow-up turn keeps the first turn's positions; without the cache, the same text.
    let follow_up = json!({"messages": [
        {"role": "user", "content": CHAT}, {"role": "assistant", "content": chat_ar},
        {"role": "user", "content": "And of Italy?"}], "max_tokens": MAX});
    let warm = s.post("/v1/chat/completions", &follow_up);
    assert_eq!(warm.status, 200, "{}", warm.json);
    let cached = warm.json["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert!(cached.unwrap() > prompt_n, "{}", warm.json);
    let mut uncached = follow_up.clone();
    uncached["cache_prompt"] = false.into();
    let cold = s.post("/v1/chat/completions", &uncached);
    assert_eq!(cold.status, 200, "{}", cold.json);
    let cached = &cold.json["usage"]["prompt_tokens_details"]["cached_tokens"];
    assert_eq!(cached.as_u64(), Some(0), "{}", cold.json);
    assert_eq!(reply_text(&warm.json), reply_text(&cold.json), "follow-up");
    // Repetition penalties (llama.cpp's names and window) give ar's text.
    let mut penalized = chat.clone();
    penalized["frequency_penalty"] = 1.5.into();
    penalized["presence_penalty"] = 0.5.into();
    let r = s.post("/v1/chat/completions", &penalized);
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(reply_text(&r.json), penalized_ar, "penalized chat vs ar");
    let mut biased = chat.clone();
    biased["logit_bias"] = json!({ first.to_string(): -100 });
    let r = s.post("/v1/chat/completions", &biased);
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(reply_text(&r.json), biased_ar, "biased chat vs ar");
    // Log-probabilities: ar's numbers and token texts, in OpenAI's chat shape.
    let mut with_logprobs = chat.clone();
    with_logprobs["logprobs"] = true.into();
    with_logprobs["top_logprobs"] = 2.into();
    let r = s.post("/v1/chat/completions", &with_logprobs);
    assert_eq!(r.status, 200, "{}", r.json);
    let content = r.json["choices"][0]["logprobs"]["content"].clone();
    let rows = logprobs_ar.as_array().expect("no logprobs from ar");
    assert_eq!(
        content.as_array().map(Vec::len),
        Some(rows.len()),
        "{content}"
    );
    for (got, want) in content.as_array().unwrap().iter().zip(rows) {
        assert_eq!(
            (&got["token"], &got["logprob"]),
            (&want["text"], &want["logprob"])
        );
        for (g, w) in got["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(want["top"].as_array().unwrap())
        {
            assert_eq!((&g["token"], &g["logprob"]), (&w["text"], &w["logprob"]));
        }
    }
    biased["logit_bias"] = json!({ "4000000": 1 });
    let r = s.post("/v1/chat/completions", &biased);
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(r.json["error"]["param"], "logit_bias", "{}", r.json);
    check_structured_output(&s, &structured_ar);
    check_echo(&s, &echo_ar);
    check_tokenize(&s);
    check_assistant_prefill(&s);
    check_llama_cpp_completion(&s, &raw_ar);

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
        "penalized": penalized_ar, "frequency_penalty": 1.5, "presence_penalty": 0.5,
        "biased": biased_ar, "logit_bias": { first.to_string(): -100 },
        "logprobs": rows.iter().map(|r| r["logprob"].clone()).collect::<Vec<_>>(),
        "structured": structured_ar, "schema": serde_json::from_str::<serde_json::Value>(SCHEMA).unwrap(),
        "structured_max_tokens": STRUCTURED_MAX,
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

/// Structured output through the worker pair: OpenAI's `response_format` and vLLM's
/// `guided_json` give `generate --strategy ar --json-schema`'s text, whole and streamed;
/// llama.cpp's GBNF `grammar` is followed; a grammar that does not compile, or two grammars at
/// once, is a 400 naming the parameter.
fn check_structured_output(s: &Served, structured_ar: &str) {
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    let messages = json!([{"role": "user", "content": CHAT}]);
    let mut req = json!({"messages": messages, "max_tokens": STRUCTURED_MAX,
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}});
    let r = s.post("/v1/chat/completions", &req);
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(reply_text(&r.json), structured_ar, "response_format vs ar");
    assert_eq!(r.json["choices"][0]["finish_reason"], "stop", "{}", r.json);
    req["stream"] = true.into();
    let (text, _) = s.stream("/v1/chat/completions", &req).rest();
    assert_eq!(text, structured_ar, "streamed response_format vs ar");
    let guided = json!({"messages": messages, "max_tokens": STRUCTURED_MAX, "guided_json": schema});
    let r = s.post("/v1/chat/completions", &guided);
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(reply_text(&r.json), structured_ar, "guided_json vs ar");
    // llama.cpp's `grammar` is GBNF.
    let gbnf = json!({"messages": messages, "max_tokens": 8,
        "grammar": "root ::= (\"yes\" | \"no\") \".\""});
    let r = s.post("/v1/chat/completions", &gbnf);
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(
        ["yes.", "no."].contains(&reply_text(&r.json).as_str()),
        "{}",
        r.json
    );
    for (body, param) in [
        (
            json!({"messages": messages, "grammar": "root ::= undefined-rule"}),
            "grammar",
        ),
        (
            json!({"messages": messages, "response_format": {"type": "json_schema",
                "json_schema": {"schema": {"type": "no such type"}}}}),
            "response_format",
        ),
        (
            json!({"messages": messages, "guided_regex": "(unclosed"}),
            "guided_regex",
        ),
        (
            json!({"messages": messages, "guided_json": schema, "guided_regex": "a"}),
            "guided_regex",
        ),
    ] {
        let r = s.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.json);
        assert_eq!(r.json["error"]["param"], param, "{}", r.json);
    }
}

/// llama.cpp's `/completion` gives `generate --strategy ar --raw`'s text, whole and streamed.
fn check_llama_cpp_completion(s: &Served, raw_ar: &str) {
    let body = json!({"prompt": RAW, "n_predict": MAX});
    let r = s.post("/completion", &body);
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["content"], raw_ar, "/completion vs ar --raw");
    assert_eq!(r.json["stop"], true, "{}", r.json);
    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    let text = s.stream("/completion", &streamed).llama_rest();
    assert_eq!(text, raw_ar, "streamed /completion vs ar --raw");
}

/// `/tokenize` counts what a completion's usage counts, `/detokenize` gives the text back, and
/// llama.cpp's `content` with pieces names each token's text.
fn check_tokenize(s: &Served) {
    let r = s.post("/tokenize", &json!({"prompt": RAW}));
    assert_eq!(r.status, 200, "{}", r.json);
    let done = s.post("/v1/completions", &json!({"prompt": RAW, "max_tokens": 1}));
    assert_eq!(
        r.json["count"], done.json["usage"]["prompt_tokens"],
        "{}",
        r.json
    );
    let back = s.post("/detokenize", &json!({"tokens": r.json["tokens"]}));
    assert_eq!(back.json["content"], RAW, "{}", back.json);
    let pieces = s.post("/tokenize", &json!({"content": RAW, "with_pieces": true}));
    let text: String = (pieces.json["tokens"].as_array().unwrap().iter())
        .map(|t| t["piece"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, RAW, "{}", pieces.json);
}

/// A conversation that ends with an assistant's text is continued (llama.cpp's assistant
/// prefill): the rendered prompt ends with that text, and the chat answer is what a completion of
/// those very tokens gives; asking for a new turn renders it closed.
fn check_assistant_prefill(s: &Served) {
    let start = "The capital of France is";
    let messages =
        json!([{"role": "user", "content": CHAT}, {"role": "assistant", "content": start}]);
    let ids = s.post("/tokenize", &json!({"messages": messages}));
    assert_eq!(ids.status, 200, "{}", ids.json);
    let text = s.post("/detokenize", &json!({"tokens": ids.json["tokens"]}));
    let rendered = text.json["content"].as_str().unwrap();
    assert!(rendered.ends_with(start), "{rendered:?}");
    let chat = s.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": 8}),
    );
    let completion = s.post(
        "/v1/completions",
        &json!({"prompt": ids.json["tokens"], "max_tokens": 8}),
    );
    assert_eq!(chat.status, 200, "{}", chat.json);
    assert_eq!(reply_text(&chat.json), reply_text(&completion.json));
    let new_turn = s.post(
        "/tokenize",
        &json!({"messages": messages, "add_generation_prompt": true}),
    );
    let count = |r: &serde_json::Value| r["count"].as_u64().unwrap();
    assert!(
        count(&new_turn.json) > count(&ids.json) + 2,
        "{}",
        new_turn.json
    );
}

/// Completions' `echo` with `logprobs` through the worker pair: the prompt's text and then the
/// answer, the log-probabilities of the prompt's tokens (the first has none) and of the answer's,
/// each `generate --strategy ar --raw --logprobs 1 --prompt-logprobs`'s.
fn check_echo(s: &Served, ar: &serde_json::Value) {
    let body = json!({"prompt": RAW, "max_tokens": MAX, "echo": true, "logprobs": 1});
    let r = s.post("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.json);
    let choice = &r.json["choices"][0];
    let text = format!("{RAW}{}", ar["text"].as_str().unwrap());
    assert_eq!(choice["text"], text.as_str(), "echoed text vs ar");
    let got = choice["logprobs"]["token_logprobs"].as_array().unwrap();
    let want: Vec<&serde_json::Value> = (ar["prompt_logprobs"].as_array().unwrap().iter())
        .chain(ar["logprobs"].as_array().unwrap())
        .map(|row| &row["logprob"])
        .collect();
    assert!(got[0].is_null(), "{}", choice["logprobs"]);
    assert_eq!(
        got[1..].iter().collect::<Vec<_>>(),
        want,
        "echoed logprobs vs ar"
    );
}

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// `--chat-template-file` renders conversations in `serve` and `generate` alike (the server's
/// chat prompt is exactly the template's text; its answer is `generate`'s), `--alias` names the
/// model, and a template that does not compile stops the server before it listens.
#[test]
fn a_chat_template_file_and_an_alias_replace_the_models() {
    require_default_model();
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("qa.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}assistant:{% endif %}",
    )
    .unwrap();
    let file = template.to_str().unwrap();
    let s = start(
        &[
            "--strategy",
            "ar",
            "--chat-template-file",
            file,
            "--alias",
            "qa-model",
        ],
        Duration::from_secs(120),
    );
    let (_, models) = s.get("/v1/models");
    assert!(models.contains(r#""id":"qa-model""#), "{models}");
    let messages = json!([{"role": "user", "content": CHAT}]);
    let rendered = format!("user: {CHAT}\nassistant:");
    let chat_ids = s.post("/tokenize", &json!({"messages": messages}));
    let text_ids = s.post("/tokenize", &json!({"content": rendered}));
    assert_eq!(
        chat_ids.json["tokens"], text_ids.json["tokens"],
        "{}",
        chat_ids.json
    );
    let r = s.post(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": MAX}),
    );
    assert_eq!(r.json["model"], "qa-model");
    let want = ar_text(&["--prompt", CHAT, "--chat-template-file", file]);
    assert_eq!(
        reply_text(&r.json),
        want,
        "serve vs generate under the template"
    );
    s.terminate(Duration::from_secs(60));
    std::fs::write(&template, "{% for m in messages %}").unwrap();
    let run = amusd_run(
        &["serve", "--port", "0", "--chat-template-file", file],
        Duration::from_secs(120),
    );
    assert!(
        !run.status.success() && run.stderr.contains("chat-template-file"),
        "{}",
        run.describe()
    );
}

/// The weather tool of the tool-calling tests, in chat's shape.
fn weather_tool() -> serde_json::Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
        "required": ["city"]}}}])
}

/// A streamed chat reply's calls, each `(name, arguments)` joined from its deltas, and its finish.
fn streamed_calls(s: &Served, req: &serde_json::Value) -> (Vec<(String, String)>, String) {
    let mut sse = s.stream("/v1/chat/completions", req);
    let (mut calls, mut finish) = (Vec::<(String, String)>::new(), String::new());
    while let Some(d) = sse.next_data() {
        if d == "[DONE]" {
            return (calls, finish);
        }
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert!(v.get("error").is_none(), "error event: {v}");
        for call in v["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = call["index"].as_u64().unwrap() as usize;
            if let Some(name) = call["function"]["name"].as_str() {
                assert_eq!(i, calls.len(), "calls are named in order: {v}");
                calls.push((name.into(), String::new()));
            }
            calls[i].1 += call["function"]["arguments"].as_str().unwrap_or_default();
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = f.into();
        }
    }
    panic!("the stream ended without [DONE]");
}

/// A chat template with a tool syntax of its own (Hermes's `<tool_call>` tags, Llama 3's JSON
/// reply) gets the tools and earlier calls to render itself, and the reply in its syntax: a
/// required call comes back as OpenAI's `tool_calls`, whole and streamed alike; with `"auto"` the
/// model may answer instead; a conversation holding a call and its result is rendered by the
/// template (its prompt has exactly the tokens of the text the template writes, arguments as an
/// object).
#[test]
fn a_templates_own_tool_syntax_is_spoken() {
    require_default_model();
    let ask = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let call = r#"{"name": "get_weather", "ARGS": {"city": "Paris"}}"#;
    for (template, args, rendered_call, result_turn) in [
        (
            "hermes-tools.jinja",
            "arguments",
            format!("<|im_start|>assistant\n<tool_call>\n{call}\n</tool_call><|im_end|>\n"),
            "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n",
        ),
        (
            "llama3-tools.jinja",
            "parameters",
            format!("<|start_header_id|>assistant<|end_header_id|>\n\n{call}<|eot_id|>"),
            "<|start_header_id|>ipython<|end_header_id|>\n\n18 C<|eot_id|>",
        ),
    ] {
        let file = workspace().join("tests/templates").join(template);
        let s = start(
            &["--chat-template-file", file.to_str().unwrap()],
            Duration::from_secs(120),
        );
        let req = json!({"messages": ask, "tools": weather_tool(), "tool_choice": "required",
            "parallel_tool_calls": false, "max_tokens": 40});
        let r = s.post("/v1/chat/completions", &req);
        let choice = &r.json["choices"][0];
        assert_eq!(
            choice["finish_reason"], "tool_calls",
            "{template}: {}",
            r.json
        );
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{template}: {}", r.json);
        let (name, arguments) = (
            &calls[0]["function"]["name"],
            &calls[0]["function"]["arguments"],
        );
        assert_eq!(name, "get_weather");
        let parsed: serde_json::Value = serde_json::from_str(arguments.as_str().unwrap()).unwrap();
        assert!(parsed["city"].is_string(), "{template}: {arguments}");
        let mut streamed = req.clone();
        streamed["stream"] = true.into();
        let want = vec![(
            "get_weather".to_string(),
            arguments.as_str().unwrap().to_string(),
        )];
        assert_eq!(
            streamed_calls(&s, &streamed),
            (want, "tool_calls".to_string()),
            "{template}: streamed vs whole"
        );
        let mut auto = req.clone();
        auto["tool_choice"] = "auto".into();
        let r = s.post("/v1/chat/completions", &auto);
        let message = &r.json["choices"][0]["message"];
        assert!(
            message["content"].is_string() != message["tool_calls"].is_array(),
            "{template}: an answer or calls: {}",
            r.json
        );
        // The earlier call and its result are the template's to write (llama.cpp's
        // `/apply-template` shows the prompt): the call with its arguments as an object, the
        // result in the template's turn for it, the tools where the template lists them.
        let turns = json!([ask[0],
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]);
        let r = s.post(
            "/apply-template",
            &json!({"messages": turns, "tools": weather_tool()}),
        );
        let prompt = r.json["prompt"]
            .as_str()
            .unwrap_or_else(|| panic!("{}", r.json));
        let call_and_result = rendered_call.replace("ARGS", args) + result_turn;
        assert!(prompt.contains(&call_and_result), "{template}: {prompt}");
        assert!(
            prompt.contains("Weather now"),
            "{template}: no tools in {prompt}"
        );
        assert!(
            !prompt.contains("tool_calls"),
            "{template}: generic format in {prompt}"
        );
        s.terminate(Duration::from_secs(60));
    }
}
