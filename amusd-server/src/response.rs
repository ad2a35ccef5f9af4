//! Response bodies in OpenAI's shapes: whole responses and streamed chunks, for both endpoints.

use serde_json::{json, Value};

use crate::decode::{Finish, LogprobEntry, Summary};
use crate::request::Endpoint;
use crate::tools::reader::ReplyEvent;
use crate::tools::{self, Reply};

/// What every response and chunk of one request shares.
#[derive(Clone, Debug)]
pub struct Head {
    pub endpoint: Endpoint,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    /// The request asked for log-probabilities.
    pub logprobs: bool,
    /// Completions' `echo`: the prompt's text and its first token's (which has no
    /// log-probability).
    pub echo: Option<Echo>,
    /// Chat with tools, in the template's syntax: each reply is read back as calls or content
    /// ([`crate::tools`]), a stream's as it comes ([`crate::tools::reader`]).
    pub tools: Option<tools::Syntax>,
    /// llama.cpp's `/completion`: its shapes, not OpenAI's (`Head::llama_answer`).
    pub llama: bool,
}

/// What an echoing response repeats of the prompt.
#[derive(Clone, Debug)]
pub struct Echo {
    pub text: String,
    pub first_token: String,
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

    /// The whole response of a non-streamed request: each choice's text and summary, in order.
    pub fn full(&self, choices: &[(String, Summary)]) -> Value {
        if let (true, [(text, s)]) = (self.llama, choices) {
            let tokens = s.tokens.as_deref().unwrap_or_default();
            return self.llama_answer(text, s, s.logprobs.as_deref(), tokens);
        }
        let items: Vec<Value> = (choices.iter().enumerate())
            .map(|(i, (text, s))| match self.endpoint {
                Endpoint::Chat => {
                    let (message, finish) = self.message(i, text, s, false);
                    json!({
                        "index": i,
                        "message": message,
                        "logprobs": self.logprobs(s.logprobs.as_deref(), 0),
                        "finish_reason": finish,
                    })
                }
                Endpoint::Completions => match &self.echo {
                    None => json!({
                        "index": i,
                        "text": text,
                        "logprobs": self.logprobs(s.logprobs.as_deref(), 0),
                        "finish_reason": s.finish,
                    }),
                    Some(e) => json!({
                        "index": i,
                        "text": format!("{}{text}", e.text),
                        "logprobs": self.echoed_logprobs(e, s),
                        "finish_reason": s.finish,
                    }),
                },
            })
            .collect();
        let summaries: Vec<&Summary> = choices.iter().map(|c| &c.1).collect();
        let (usage, timings) = Summary::combined(&summaries);
        let mut v = self.envelope(false, json!(items));
        v["usage"] = json!(usage);
        v["timings"] = json!(timings);
        v
    }

    /// A chat choice's message (or a stream's delta) and finish reason: the text as content, or
    /// with tools the reply read back: its calls ([`calls_finish`]) or its answer.
    fn message(&self, i: usize, text: &str, s: &Summary, streamed: bool) -> (Value, Value) {
        let plain = |content: &str| {
            (
                json!({"role": "assistant", "content": content}),
                json!(s.finish),
            )
        };
        let Some(syntax) = self.tools else {
            return plain(text);
        };
        let (mut message, finish) = match tools::read_reply(text, syntax) {
            Reply::Content(c) => plain(&c),
            Reply::Calls(calls) => (
                json!({"role": "assistant", "content": null,
                    "tool_calls": tools::tool_calls_json(&calls, &self.id, i, streamed)}),
                calls_finish(s),
            ),
        };
        if streamed {
            // The stream's opening chunk said the role.
            message.as_object_mut().map(|m| m.remove("role"));
        }
        (message, finish)
    }

    /// A chat stream's chunk of choice `i`'s tool reply as it is read ([`crate::tools::reader`]):
    /// a call named (its index, id, name, empty arguments), more of a call's arguments, or more
    /// of the answer's content; with the log-probabilities of the tokens that completed it.
    pub fn tool_delta(&self, i: usize, event: &ReplyEvent, logprobs: &[LogprobEntry]) -> Value {
        let delta = match event {
            ReplyEvent::Call { index, name } => json!({"tool_calls": [{"index": index,
                "id": tools::call_id(&self.id, i, *index), "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
            ReplyEvent::Arguments { index, text } => {
                json!({"tool_calls": [{"index": index, "function": {"arguments": text}}]})
            }
            ReplyEvent::Content(text) => json!({"content": text}),
        };
        let choice = json!({"index": i, "delta": delta,
            "logprobs": self.logprobs(Some(logprobs), 0), "finish_reason": null});
        let mut v = self.envelope(true, json!([choice]));
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The chunk that ends choice `i`'s tool reply: finish reason `tool_calls` if it made
    /// calls, the log-probabilities not sent yet, `timings`.
    pub fn tool_end(&self, i: usize, calls: bool, s: &Summary, logprobs: &[LogprobEntry]) -> Value {
        let finish = if calls {
            calls_finish(s)
        } else {
            json!(s.finish)
        };
        let choice = json!({"index": i, "delta": {},
            "logprobs": self.logprobs(Some(logprobs), 0), "finish_reason": finish});
        let mut v = self.envelope(true, json!([choice]));
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v["timings"] = json!(s.timings);
        v
    }

    /// Tokens' `logprobs` in the endpoint's shape (chat: `content`, a list of token objects;
    /// completions: the parallel lists, `text_offset` counted from `offset`), or null when the
    /// request did not ask.
    fn logprobs(&self, entries: Option<&[LogprobEntry]>, offset: usize) -> Value {
        let Some(entries) = entries.filter(|_| self.logprobs) else {
            return Value::Null;
        };
        match self.endpoint {
            Endpoint::Chat => json!({"content": token_logprobs(entries), "refusal": null}),
            Endpoint::Completions => {
                completions_logprobs(None, &entries.iter().collect::<Vec<_>>(), offset)
            }
        }
    }

    /// An echoing completion's log-probabilities: the prompt's first token (none), the rest of
    /// the prompt's, then the generated tokens'; null when the request did not ask.
    fn echoed_logprobs(&self, e: &Echo, s: &Summary) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        let entries: Vec<&LogprobEntry> = (s.prompt_logprobs.iter().flatten())
            .chain(s.logprobs.iter().flatten())
            .collect();
        completions_logprobs(Some(&e.first_token), &entries, 0)
    }

    /// A streamed chunk of choice `i`; `role` only in a choice's first chat chunk; `logprobs`: its
    /// tokens' (text chunks, when asked for) and where their text starts in the choice's.
    fn chunk(
        &self,
        i: usize,
        text: Option<&str>,
        role: bool,
        finish: Option<&Summary>,
        logprobs: Option<(&[LogprobEntry], usize)>,
    ) -> Value {
        let finish_reason = finish.map(|s| json!(s.finish)).unwrap_or(Value::Null);
        let logprobs = match logprobs {
            Some((entries, offset)) => self.logprobs(Some(entries), offset),
            None => Value::Null,
        };
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = "assistant".into();
                }
                if let Some(t) = text {
                    delta["content"] = t.into();
                }
                json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            }
            Endpoint::Completions => json!({
                "index": i,
                "text": text.unwrap_or(""),
                "logprobs": logprobs,
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

    /// The chunk that opens choice `i` of a stream, if the endpoint has one: chat's (the
    /// assistant's role, no text yet), or an echoing completion's (the prompt's text).
    pub fn opening(&self, i: usize) -> Option<Value> {
        match (self.endpoint, &self.echo) {
            (Endpoint::Chat, _) => Some(self.chunk(i, Some(""), true, None, None)),
            (Endpoint::Completions, Some(e)) => {
                Some(self.chunk(i, Some(&e.text), false, None, None))
            }
            (Endpoint::Completions, None) => None,
        }
    }

    /// A text chunk of choice `i`, with the log-probabilities of the tokens that completed it
    /// (`offset`: where its text starts in the choice's) and, llama.cpp's, their ids (when asked).
    pub fn text(
        &self,
        i: usize,
        text: &str,
        logprobs: &[LogprobEntry],
        ids: &[u32],
        offset: usize,
    ) -> Value {
        if self.llama {
            let mut v = json!({"index": 0, "content": text, "tokens": ids, "stop": false,
                "id_slot": 0});
            if self.logprobs {
                v["completion_probabilities"] = token_logprobs(logprobs);
            }
            return v;
        }
        self.chunk(i, Some(text), false, None, Some((logprobs, offset)))
    }

    /// The chunk that ends choice `i`: its finish reason, with its `timings`.
    pub fn choice_end(&self, i: usize, s: &Summary) -> Value {
        if self.llama {
            // The text and its ids went in the chunks, as llama.cpp's stream has it.
            return self.llama_answer("", s, None, &[]);
        }
        self.chunk(i, None, false, Some(s), None)
    }

    /// llama.cpp's `/completion` answer, whole or as a stream's last event: the text and its
    /// token ids (`tokens`: with `return_tokens`, else empty, as llama.cpp's), why it stopped
    /// (`stop_type`: `eos`, `word` or `limit`), the counts and `timings`, and with `n_probs` the
    /// tokens' `completion_probabilities`.
    fn llama_answer(
        &self,
        text: &str,
        s: &Summary,
        logprobs: Option<&[LogprobEntry]>,
        tokens: &[u32],
    ) -> Value {
        let stop_type = match (s.finish, s.stopped_by_word) {
            (crate::decode::Finish::Length, _) => "limit",
            (_, true) => "word",
            _ => "eos",
        };
        let mut v = json!({
            "index": 0, "content": text, "tokens": tokens, "id_slot": 0, "stop": true,
            "model": self.model,
            "tokens_predicted": s.usage.completion_tokens,
            "tokens_evaluated": s.usage.prompt_tokens, "tokens_cached": s.timings.cache_n,
            "truncated": false, "stop_type": stop_type, "stopping_word": "",
            "timings": s.timings,
        });
        if let Some(entries) = logprobs.filter(|_| self.logprobs) {
            v["completion_probabilities"] = token_logprobs(entries);
        }
        v
    }

    /// What closes the stream after the last choice's end: the usage of all choices, if asked
    /// for (llama.cpp's stream has none).
    pub fn closing(&self, all: &[Summary]) -> Option<Value> {
        (self.include_usage && !self.llama).then(|| {
            let mut v = self.envelope(true, json!([]));
            v["usage"] = json!(Summary::combined(&all.iter().collect::<Vec<_>>()).0);
            v
        })
    }
}

/// Per token its text, log-probability and bytes, and its position's most likely tokens': chat's
/// `logprobs.content`, the Responses API's, and llama.cpp's `completion_probabilities`.
pub(crate) fn token_logprobs(entries: &[LogprobEntry]) -> Value {
    let token =
        |text: &str, lp: f32| json!({"token": text, "logprob": lp, "bytes": text.as_bytes()});
    (entries.iter())
        .map(|e| {
            let mut v = token(&e.text, e.logprob);
            v["top_logprobs"] = e.top.iter().map(|(t, lp)| token(t, *lp)).collect();
            v
        })
        .collect()
}

/// Completions' parallel lists: `lead` (an echoed prompt's first token, with no log-probability)
/// then `entries`, `text_offset` counted from `offset`.
fn completions_logprobs(lead: Option<&str>, entries: &[&LogprobEntry], offset: usize) -> Value {
    let texts: Vec<&str> = (lead.into_iter())
        .chain(entries.iter().map(|e| e.text.as_str()))
        .collect();
    let offsets: Vec<usize> = (texts.iter())
        .scan(offset, |at, t| {
            let here = *at;
            *at += t.len();
            Some(here)
        })
        .collect();
    let nulls = || lead.iter().map(|_| Value::Null);
    let logprobs: Vec<Value> = nulls()
        .chain(entries.iter().map(|e| json!(e.logprob)))
        .collect();
    let top = |e: &&LogprobEntry| -> Value {
        (e.top.iter())
            .map(|(t, lp)| (t.clone(), json!(lp)))
            .collect::<serde_json::Map<String, Value>>()
            .into()
    };
    let tops: Vec<Value> = nulls().chain(entries.iter().map(top)).collect();
    json!({"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets})
}

/// A reply of calls ends in `tool_calls`, unless `max_tokens` cut it (its last call's arguments
/// unfinished): then `length`, as OpenAI's, so that a client does not run a call cut in half.
fn calls_finish(s: &Summary) -> Value {
    match s.finish {
        Finish::Length => json!("length"),
        Finish::Stop => json!("tool_calls"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{PromptTokensDetails, Timings, Usage};

    fn summary() -> Summary {
        Summary {
            finish: Finish::Length,
            stopped_by_word: false,
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
            logprobs: None,
            prompt_logprobs: None,
            tokens: None,
        }
    }

    fn head(endpoint: Endpoint, include_usage: bool) -> Head {
        Head {
            endpoint,
            id: "x".into(),
            created: 1,
            model: "m".into(),
            include_usage,
            logprobs: false,
            echo: None,
            tools: None,
            llama: false,
        }
    }

    #[test]
    fn chat_shapes() {
        let h = head(Endpoint::Chat, true);
        let full = h.full(&[("hi".into(), summary())]);
        assert_eq!(full["object"], "chat.completion");
        assert_eq!(full["choices"][0]["message"]["content"], "hi");
        assert_eq!(full["choices"][0]["finish_reason"], "length");
        assert_eq!(full["usage"]["total_tokens"], 5);
        assert_eq!(full["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
        assert_eq!(full["timings"]["cache_n"], 1);
        assert_eq!(full["timings"]["draft_n_accepted"], 3);
        assert_eq!(
            h.opening(0).unwrap()["choices"][0]["delta"]["role"],
            "assistant"
        );
        assert_eq!(
            h.text(0, "a", &[], &[], 0)["choices"][0]["delta"]["content"],
            "a"
        );
        assert!(h.text(0, "a", &[], &[], 0)["usage"].is_null());
        let end = h.choice_end(0, &summary());
        assert_eq!(end["choices"][0]["finish_reason"], "length");
        let closing = h.closing(&[summary()]).unwrap();
        assert_eq!(closing["choices"], json!([]));
        assert_eq!(closing["usage"]["completion_tokens"], 2);
    }

    /// Several choices: each has its index; the prompt counts once, the generated tokens, their
    /// time and the drafts add up.
    #[test]
    fn choices_and_their_usage() {
        let h = head(Endpoint::Chat, true);
        let mut second = summary();
        second.finish = Finish::Stop;
        second.usage.completion_tokens = 5;
        second.timings.predicted_n = 5;
        let full = h.full(&[("hi".into(), summary()), ("there".into(), second.clone())]);
        assert_eq!(full["choices"][1]["index"], 1);
        assert_eq!(full["choices"][1]["message"]["content"], "there");
        assert_eq!(full["choices"][1]["finish_reason"], "stop");
        assert_eq!(full["usage"]["prompt_tokens"], 3);
        assert_eq!(full["usage"]["completion_tokens"], 7);
        assert_eq!(full["usage"]["total_tokens"], 10);
        assert_eq!(full["timings"]["predicted_n"], 7);
        assert_eq!(full["timings"]["predicted_ms"], 4.0);
        assert_eq!(full["timings"]["draft_n"], 8);
        assert_eq!(h.text(1, "a", &[], &[], 0)["choices"][0]["index"], 1);
        let closing = h.closing(&[summary(), second]).unwrap();
        assert_eq!(closing["usage"]["completion_tokens"], 7);
    }

    /// With tools, a reply of calls becomes OpenAI's `tool_calls`, whole or as the stream's last
    /// delta; an answer becomes the content; text in neither form stays as it is.
    #[test]
    fn tool_replies() {
        let h = Head {
            tools: Some(tools::Syntax::Generic),
            ..head(Endpoint::Chat, false)
        };
        let mut stop = summary();
        stop.finish = Finish::Stop;
        let calls = r#"{"tool_calls": [{"name": "f", "arguments": {"a": [1]}}]}"#;
        let full = h.full(&[(calls.into(), stop.clone())]);
        let choice = &full["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert!(choice["message"]["content"].is_null());
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert_eq!(call["id"], "call_x_0_0");
        assert_eq!(call["function"]["name"], "f");
        assert_eq!(call["function"]["arguments"], r#"{"a":[1]}"#);
        assert!(call.get("index").is_none());
        let answer = h.full(&[(r#"{"response": "Hello"}"#.into(), stop.clone())]);
        assert_eq!(answer["choices"][0]["message"]["content"], "Hello");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
        let cut = h.full(&[(r#"{"respo"#.into(), summary())]);
        assert_eq!(cut["choices"][0]["message"]["content"], r#"{"respo"#);
        assert_eq!(cut["choices"][0]["finish_reason"], "length");
        // Streamed: the name with the id the whole response gives, then arguments, then the end.
        let named = h.tool_delta(
            0,
            &ReplyEvent::Call {
                index: 0,
                name: "f".into(),
            },
            &[],
        );
        let delta = &named["choices"][0]["delta"];
        assert_eq!(delta["tool_calls"][0]["index"], 0);
        assert_eq!(delta["tool_calls"][0]["id"], call["id"]);
        assert_eq!(delta["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(delta["tool_calls"][0]["function"]["arguments"], "");
        assert!(delta.get("role").is_none());
        assert!(named["choices"][0]["finish_reason"].is_null());
        let args = h.tool_delta(
            0,
            &ReplyEvent::Arguments {
                index: 0,
                text: "{\"a\"".into(),
            },
            &[],
        );
        assert_eq!(
            args["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\""
        );
        let last = h.tool_end(0, true, &stop, &[]);
        assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
        // Calls cut by max_tokens end in `length`, whole and streamed.
        let cut_call = r#"{"tool_calls": [{"name": "f", "arguments": {"a": [1"#;
        let whole = h.full(&[(cut_call.into(), summary())]);
        assert_eq!(whole["choices"][0]["finish_reason"], "length");
        assert_eq!(
            whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            r#"{"a":[1"#
        );
        let last = h.tool_end(0, true, &summary(), &[]);
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["object"], "chat.completion.chunk");
    }

    #[test]
    fn completion_shapes() {
        let h = head(Endpoint::Completions, false);
        assert_eq!(
            h.full(&[("hi".into(), summary())])["choices"][0]["text"],
            "hi"
        );
        assert!(h.opening(0).is_none());
        assert_eq!(h.text(0, "a", &[], &[], 0)["object"], "text_completion");
        assert!(h.closing(&[summary()]).is_none());
    }
}
