//! Any JSON body, to any generation endpoint, is answered: a response or a clean error, never a
//! panic, a hang or a 500. The bodies are built from the fields the endpoints read, with values of
//! every JSON type, so the cases reach past the first type check.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::Value;
use tower::ServiceExt;

use crate::tests::{fake_server, Hooks};

/// Field names the endpoints and their nested objects read.
const KEYS: &[&str] = &[
    "messages",
    "prompt",
    "input",
    "instructions",
    "role",
    "content",
    "type",
    "text",
    "name",
    "arguments",
    "call_id",
    "output",
    "tool_calls",
    "tool_call_id",
    "function",
    "parameters",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n_predict",
    "n_probs",
    "stop",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "top_n_sigma",
    "xtc_probability",
    "xtc_threshold",
    "dynatemp_range",
    "dynatemp_exponent",
    "seed",
    "n",
    "stream",
    "stream_options",
    "include_usage",
    "logprobs",
    "top_logprobs",
    "include",
    "echo",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "repeat_last_n",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "dry_sequence_breakers",
    "response_format",
    "json_schema",
    "schema",
    "format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "grammar",
    "structured_outputs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "previous_response_id",
    "store",
    "mirostat",
    "tfs_z",
    "best_of",
    "cache_prompt",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-3i64..70).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(-1.5f64),
            Just(0.0),
            Just(0.5),
            Just(1.0),
            Just(2.0),
            Just(1e300)
        ]
        .prop_map(Value::from),
        prop_oneof![
            Just("user"),
            Just("assistant"),
            Just("tool"),
            Just("system"),
            Just("function"),
            Just("json_object"),
            Just("json_schema"),
            Just("text"),
            Just("auto"),
            Just("required"),
            Just("none"),
            Just(""),
            Just("ab"),
            Just("root ::= \"a\""),
            Just("é\u{0}"),
            Just("message"),
            Just("function_call"),
            Just("function_call_output"),
        ]
        .prop_map(Value::from),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// A body for `path`: a valid request with up to three fields set to anything (so that many
/// cases pass validation and generate), or at times anything at all.
fn body(path: &'static str) -> impl Strategy<Value = String> {
    let base = match path {
        "/v1/chat/completions" | "/apply-template" => {
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#
        }
        "/v1/responses" => r#"{"input": "hi"}"#,
        "/tokenize" => r#"{"content": "hi"}"#,
        "/detokenize" => r#"{"tokens": [104, 105]}"#,
        _ => r#"{"prompt": "hi"}"#,
    };
    let base: Value = serde_json::from_str(base).unwrap();
    let field = (
        prop::sample::select(KEYS),
        prop_oneof![3 => leaf(), 1 => json()],
    );
    prop_oneof![
        6 => prop::collection::vec(field, 0..4).prop_map(move |kv| {
            let mut b = base.clone();
            for (k, v) in kv {
                b[k] = v;
            }
            b.to_string()
        }),
        1 => json().prop_map(|v| v.to_string()),
        1 => "\\PC{0,40}",
    ]
}

const ENDPOINTS: [&str; 7] = [
    "/v1/chat/completions",
    "/apply-template",
    "/v1/completions",
    "/v1/responses",
    "/completion",
    "/tokenize",
    "/detokenize",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_body_gets_an_answer_or_a_clean_error(
        (path, body) in prop::sample::select(&ENDPOINTS[..]).prop_flat_map(|p| (Just(p), body(p)))
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let server = Arc::new(fake_server(Hooks::default(), 8));
        let status = rt.block_on(async {
            let req = Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body.clone()))
                .unwrap();
            let resp = server.router.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            // The whole body, streams included: a stream must end.
            let bytes = tokio::time::timeout(std::time::Duration::from_secs(10), resp.into_body().collect())
                .await
                .expect("the response never ended")
                .unwrap()
                .to_bytes();
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            if !status.is_success() {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{text}");
            }
            status
        });
        prop_assert!(status.is_success() || status.is_client_error(), "{path} {body}: {status}");
    }
}
