//! Response bodies in OpenAI's shapes: whole responses and streamed chunks, for both endpoints.

use serde_json::{json, Value};

use crate::decode::Summary;
use crate::request::Endpoint;

/// What every response and chunk of one request shares.
#[derive(Clone, Debug)]
pub struct Head {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

impl Head {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    /// The whole response of a non-streamed request.
    pub fn full(&self, text: &str, s: &Summary) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": s.finish,
            }),
            Endpoint::Completions => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": s.finish,
            }),
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = json!(s.usage);
        v["timings"] = json!(s.timings);
        v
    }

    /// A streamed chunk; `role` only in the first chat chunk.
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&Summary>) -> Value {
        let finish_reason = finish.map(|s| json!(s.finish)).unwrap_or(Value::Null);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = "assistant".into();
                }
                if let Some(t) = text {
                    delta["content"] = t.into();
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason})
            }
            Endpoint::Completions => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        };
        let mut v = self.envelope(true, json!([choice]));
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        if let Some(s) = finish {
            v["timings"] = json!(s.timings);
        }
        v
    }

    /// The chunk that opens a chat stream (the assistant's role, no text yet), if the endpoint has one.
    pub fn opening(&self) -> Option<Value> {
        (self.endpoint == Endpoint::Chat).then(|| self.chunk(Some(""), true, None))
    }

    pub fn text(&self, text: &str) -> Value {
        self.chunk(Some(text), false, None)
    }

    /// The closing chunks: the finish reason (with `timings`), then usage if asked for.
    pub fn closing(&self, s: &Summary) -> Vec<Value> {
        let mut out = vec![self.chunk(None, false, Some(s))];
        if self.include_usage {
            let mut v = self.envelope(true, json!([]));
            v["usage"] = json!(s.usage);
            out.push(v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Finish, PromptTokensDetails, Timings, Usage};

    fn summary() -> Summary {
        Summary {
            finish: Finish::Length,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                total_tokens: 5,
                prompt_tokens_details: PromptTokensDetails { cached_tokens: 1 },
            },
            timings: Timings {
                prompt_n: 3,
                prompt_ms: 1.0,
                predicted_n: 2,
                predicted_ms: 2.0,
                predicted_per_second: 500.0,
                draft_n: 4,
                draft_n_accepted: 3,
                cache_n: 1,
            },
        }
    }

    fn head(endpoint: Endpoint, include_usage: bool) -> Head {
        Head {
            endpoint,
            id: "x".into(),
            created: 1,
            model: "m".into(),
            include_usage,
        }
    }

    #[test]
    fn chat_shapes() {
        let h = head(Endpoint::Chat, true);
        let full = h.full("hi", &summary());
        assert_eq!(full["object"], "chat.completion");
        assert_eq!(full["choices"][0]["message"]["content"], "hi");
        assert_eq!(full["choices"][0]["finish_reason"], "length");
        assert_eq!(full["usage"]["total_tokens"], 5);
        assert_eq!(full["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
        assert_eq!(full["timings"]["cache_n"], 1);
        assert_eq!(full["timings"]["draft_n_accepted"], 3);
        assert_eq!(
            h.opening().unwrap()["choices"][0]["delta"]["role"],
            "assistant"
        );
        assert_eq!(h.text("a")["choices"][0]["delta"]["content"], "a");
        assert!(h.text("a")["usage"].is_null());
        let closing = h.closing(&summary());
        assert_eq!(closing.len(), 2);
        assert_eq!(closing[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(closing[1]["choices"], json!([]));
        assert_eq!(closing[1]["usage"]["completion_tokens"], 2);
    }

    #[test]
    fn completion_shapes() {
        let h = head(Endpoint::Completions, false);
        assert_eq!(h.full("hi", &summary())["choices"][0]["text"], "hi");
        assert!(h.opening().is_none());
        assert_eq!(h.text("a")["object"], "text_completion");
        assert_eq!(h.closing(&summary()).len(), 1);
    }
}
