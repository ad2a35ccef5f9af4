//! The Response object and its output items: a message with one `output_text` part, or with
//! tools the reply's function calls.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::store::{Store, Stored};
use super::Echoed;
use crate::decode::{Finish, LogprobEntry, Summary};
use crate::response::token_logprobs;
use crate::tools::{self, Reply};

/// What every event of one response shares.
#[derive(Clone, Debug)]
pub struct Responder {
    /// `resp_...`
    pub id: String,
    pub created_at: u64,
    pub model: String,
    pub echoed: Echoed,
    /// The request asked for log-probabilities.
    pub logprobs: bool,
    /// The reply is read back as calls or content ([`crate::tools`]).
    pub tools: Option<tools::Syntax>,
    /// Where the finished response is kept, with its conversation before it (none: not kept).
    pub keep: Option<(Arc<Store>, Vec<Value>)>,
}

/// An output item's status by how its generation ended.
pub fn item_status(s: &Summary) -> &'static str {
    match s.finish {
        Finish::Length => "incomplete",
        Finish::Stop => "completed",
    }
}

impl Responder {
    /// The message item's id, from the response's.
    pub fn message_id(&self) -> String {
        format!("msg_{}", self.suffix())
    }

    fn suffix(&self) -> &str {
        self.id.strip_prefix("resp_").unwrap_or(&self.id)
    }

    /// The Response object: `status` and `output`, and once `done` its usage (a reply cut by
    /// `max_output_tokens` is `incomplete`, as OpenAI's).
    pub fn response(&self, status: &str, output: Vec<Value>, done: Option<&Summary>) -> Value {
        let mut v = json!({
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "error": null, "incomplete_details": null,
            "model": self.model, "output": output, "usage": null,
            "previous_response_id": null, "reasoning": {"effort": null, "summary": null},
            "store": self.keep.is_some(), "truncation": "disabled", "user": null,
        });
        for (k, val) in &self.echoed.0 {
            v[k] = val.clone();
        }
        if let Some(s) = done {
            let u = &s.usage;
            v["usage"] = json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.prompt_tokens_details.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens,
            });
            if s.finish == Finish::Length {
                v["status"] = "incomplete".into();
                v["incomplete_details"] = json!({"reason": "max_output_tokens"});
            }
        }
        v
    }

    /// The whole response to a request that was not streamed.
    pub fn whole(&self, text: &str, s: &Summary) -> Value {
        let logprobs = s.logprobs.as_deref().unwrap_or_default();
        self.response("completed", self.items(text, logprobs, s), Some(s))
    }

    /// Keeps the finished response `v`, if the request is to be kept.
    pub fn keep(&self, v: &Value) {
        if let Some((store, input)) = &self.keep {
            let stored = Stored {
                response: v.clone(),
                input: self.identified(input),
            };
            store.put(self.id.clone(), stored);
        }
    }

    /// Input items as a listing shows them, OpenAI's: each with a type, an id (this response's,
    /// for those the client sent without one) and a status, a message's content as typed text
    /// parts ([`text_parts`]); reasoning items, which no prompt reads, left out.
    fn identified(&self, input: &[Value]) -> Vec<Value> {
        (input.iter().enumerate())
            .filter(|(_, item)| item["type"] != "reasoning")
            .map(|(i, item)| {
                let mut item = item.clone();
                // Every kept item is an object: the request's were read as chat messages.
                if let Some(o) = item.as_object_mut() {
                    let kind = o.entry("type").or_insert("message".into());
                    let prefix = match kind.as_str() {
                        Some("function_call_output") => "fco",
                        Some("function_call") => "fc",
                        _ => "msg",
                    };
                    let id = format!("{prefix}_{}_in{i}", self.suffix());
                    o.entry("id").or_insert(id.into());
                    o.entry("status").or_insert("completed".into());
                    if prefix == "msg" {
                        text_parts(o);
                    }
                }
                item
            })
            .collect()
    }

    /// A finished reply's output items: its message, or with tools its calls (or its answer).
    pub fn items(&self, text: &str, logprobs: &[LogprobEntry], s: &Summary) -> Vec<Value> {
        let status = item_status(s);
        let Some(syntax) = self.tools else {
            return vec![self.message(status, vec![self.text_part(text, logprobs)])];
        };
        match tools::read_reply(text, syntax) {
            Reply::Content(c) => vec![self.message(status, vec![self.text_part(&c, logprobs)])],
            Reply::Calls(calls) => (calls.iter().enumerate())
                .map(|(k, (name, arguments))| self.call(k, name, arguments, "completed"))
                .collect(),
        }
    }

    /// The message item.
    pub fn message(&self, status: &str, content: Vec<Value>) -> Value {
        json!({"type": "message", "id": self.message_id(), "status": status,
            "role": "assistant", "content": content})
    }

    /// An `output_text` content part, with its tokens' log-probabilities when asked for.
    pub fn text_part(&self, text: &str, logprobs: &[LogprobEntry]) -> Value {
        json!({"type": "output_text", "text": text, "annotations": [],
            "logprobs": self.logprobs_of(logprobs)})
    }

    /// Tokens' log-probabilities in chat's token shape (empty when not asked for).
    pub fn logprobs_of(&self, entries: &[LogprobEntry]) -> Value {
        match self.logprobs {
            true => token_logprobs(entries),
            false => json!([]),
        }
    }

    /// Function call `k`'s item id.
    pub fn call_item_id(&self, k: usize) -> String {
        format!("fc_{}_{k}", self.suffix())
    }

    /// Function call `k` of the reply.
    pub fn call(&self, k: usize, name: &str, arguments: &str, status: &str) -> Value {
        let suffix = self.suffix();
        json!({"type": "function_call", "id": self.call_item_id(k),
            "call_id": format!("call_{suffix}_{k}"), "name": name, "arguments": arguments,
            "status": status})
    }
}

/// A message item's content as OpenAI lists it: a list of parts, its text `input_text`
/// (`output_text`, with no annotations, in an assistant's), whether the client sent a string or
/// parts (chat's `text` among them). Other parts stay as they are (a request with any other was
/// refused).
fn text_parts(message: &mut Map<String, Value>) {
    let kind = match message.get("role").and_then(Value::as_str) {
        Some("assistant") => "output_text",
        _ => "input_text",
    };
    let part = |text: Value| match kind {
        "output_text" => json!({"type": kind, "text": text, "annotations": []}),
        _ => json!({"type": kind, "text": text}),
    };
    let content = match message.remove("content") {
        Some(Value::String(s)) => json!([part(s.into())]),
        Some(Value::Array(parts)) => (parts.into_iter())
            .map(|p| match p["type"].as_str() {
                Some("text") => part(p["text"].clone()),
                _ => p,
            })
            .collect(),
        // Not text: the request was refused, so none is kept.
        Some(other) => other,
        None => return,
    };
    message.insert("content".into(), content);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::decode::{PromptTokensDetails, Timings, Usage};

    pub(crate) fn summary(finish: Finish) -> Summary {
        Summary {
            finish,
            stopped_by_word: false,
            usage: Usage {
                prompt_tokens: 4,
                completion_tokens: 2,
                total_tokens: 6,
                prompt_tokens_details: PromptTokensDetails { cached_tokens: 1 },
            },
            timings: Timings {
                prompt_n: 4,
                prompt_ms: 1.0,
                predicted_n: 2,
                predicted_ms: 1.0,
                predicted_per_second: 1000.0,
                draft_n: 0,
                draft_n_accepted: 0,
                cache_n: 1,
            },
            logprobs: None,
            prompt_logprobs: None,
            tokens: None,
        }
    }

    pub(crate) fn responder(tools: bool) -> Responder {
        let body = br#"{"input": "x", "max_output_tokens": 2, "store": false}"#;
        let parsed = super::super::parse(body, &Store::new(1)).unwrap();
        Responder {
            id: "resp_ab-1".into(),
            created_at: 7,
            model: "m".into(),
            echoed: parsed.echoed,
            logprobs: false,
            tools: tools.then_some(tools::Syntax::Generic),
            keep: None,
        }
    }

    #[test]
    fn a_whole_response_and_its_usage() {
        let r = responder(false);
        let v = r.whole("Hi.", &summary(Finish::Stop));
        assert_eq!(
            (v["object"].as_str(), v["status"].as_str()),
            (Some("response"), Some("completed"))
        );
        assert_eq!(v["output"][0]["id"], "msg_ab-1");
        assert_eq!(v["output"][0]["content"][0]["text"], "Hi.");
        assert_eq!(v["output"][0]["status"], "completed");
        assert_eq!(v["usage"]["input_tokens"], 4);
        assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 1);
        assert_eq!(v["usage"]["total_tokens"], 6);
        assert_eq!(v["max_output_tokens"], 2);
        assert!(v["incomplete_details"].is_null());
        let cut = r.whole("Hi", &summary(Finish::Length));
        assert_eq!(cut["status"], "incomplete");
        assert_eq!(cut["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(cut["output"][0]["status"], "incomplete");
    }

    /// Kept input items are listed as OpenAI lists them: every one with an id and a status, a
    /// message's text as typed parts; ids and statuses the items had are kept.
    #[test]
    fn kept_input_items_have_ids_statuses_and_typed_parts() {
        let r = responder(false);
        let items = r.identified(&[
            json!({"role": "user", "content": "a"}),
            json!({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}),
            json!({"type": "function_call_output", "call_id": "c", "output": "1"}),
            json!({"type": "reasoning", "summary": []}),
            json!({"type": "message", "id": "msg_x", "status": "incomplete", "role": "assistant",
                "content": [{"type": "output_text", "text": "b", "annotations": []}]}),
        ]);
        assert_eq!(items.len(), 4);
        assert_eq!(
            items[0],
            json!({"type": "message", "id": "msg_ab-1_in0", "status": "completed",
                "role": "user", "content": [{"type": "input_text", "text": "a"}]})
        );
        assert_eq!(
            (items[1]["id"].as_str(), items[1]["status"].as_str()),
            (Some("fc_ab-1_in1"), Some("completed"))
        );
        assert_eq!(items[2]["status"], "completed");
        assert_eq!(
            (items[3]["id"].as_str(), items[3]["status"].as_str()),
            (Some("msg_x"), Some("incomplete"))
        );
        assert_eq!(items[3]["content"][0]["type"], "output_text");
    }

    #[test]
    fn with_tools_calls_are_items_and_an_answer_a_message() {
        let r = responder(true);
        let calls = r#"{"tool_calls": [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]}"#;
        let v = r.whole(calls, &summary(Finish::Stop));
        assert_eq!(v["output"].as_array().unwrap().len(), 2);
        let call = &v["output"][1];
        assert_eq!(
            (call["type"].as_str(), call["name"].as_str()),
            (Some("function_call"), Some("g"))
        );
        assert_eq!(call["call_id"], "call_ab-1_1");
        assert_eq!(v["output"][0]["arguments"], r#"{"a":1}"#);
        let answer = r.whole(r#"{"response": "No call."}"#, &summary(Finish::Stop));
        assert_eq!(answer["output"][0]["content"][0]["text"], "No call.");
    }
}
