//! A streamed response: OpenAI's named, numbered events. `response.created` and
//! `response.in_progress`; the message item and its text part opened, one
//! `response.output_text.delta` per text piece, then their `.done` events; `response.completed`
//! (or `response.incomplete`, cut by `max_output_tokens`) with the whole Response. With tools the
//! reply is read as it comes ([`crate::tools::reader`]): each call's item opens once its name is
//! read and its arguments stream in deltas; an answer is a message whose text streams. A failure
//! is an `error` event, and the stream ends.

use std::collections::VecDeque;

use serde_json::{json, Value};

use super::render::{item_status, Responder};
use crate::decode::{Event, LogprobEntry, Summary};
use crate::error::ApiError;
use crate::routes::{Outgoing, Shape};
use crate::tools::reader::{ReplyEvent, ReplyReader};
use crate::tools::Reply;

pub struct ResponseStream {
    r: Responder,
    /// Every event's `sequence_number`.
    seq: u64,
    /// The reply so far and its tokens' log-probabilities.
    text: String,
    logprobs: Vec<LogprobEntry>,
    /// With tools, the reply read as it comes: its calls' items open as they are named, an
    /// answer's message as its text starts.
    reader: ReplyReader,
    message_open: bool,
}

impl ResponseStream {
    /// The stream and its opening events.
    pub(crate) fn open(r: Responder) -> (Self, VecDeque<Outgoing>) {
        let reader = ReplyReader::new(r.tools.unwrap_or_default());
        let mut s = Self {
            r,
            seq: 0,
            text: String::new(),
            logprobs: Vec::new(),
            reader,
            message_open: false,
        };
        let mut out = VecDeque::new();
        let started = s.r.response("in_progress", Vec::new(), None);
        s.emit(&mut out, "response.created", json!({"response": started}));
        s.emit(
            &mut out,
            "response.in_progress",
            json!({"response": started}),
        );
        if s.r.tools.is_none() {
            s.open_message(&mut out);
        }
        (s, out)
    }

    fn emit(&mut self, out: &mut VecDeque<Outgoing>, kind: &'static str, mut data: Value) {
        data["type"] = kind.into();
        data["sequence_number"] = self.seq.into();
        self.seq += 1;
        out.push_back(Outgoing {
            name: Some(kind),
            data: data.to_string(),
        });
    }

    /// Where the message's text part is.
    fn at(&self) -> Value {
        json!({"item_id": self.r.message_id(), "output_index": 0, "content_index": 0})
    }

    fn open_message(&mut self, out: &mut VecDeque<Outgoing>) {
        let item = self.r.message("in_progress", Vec::new());
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        );
        let mut part = self.at();
        part["part"] = self.r.text_part("", &[]);
        self.emit(out, "response.content_part.added", part);
    }

    fn delta(&mut self, out: &mut VecDeque<Outgoing>, text: &str, logprobs: &[LogprobEntry]) {
        let mut d = self.at();
        d["delta"] = text.into();
        d["logprobs"] = self.r.logprobs_of(logprobs);
        self.emit(out, "response.output_text.delta", d);
    }

    /// The `.done` events of the message holding `text`.
    fn close_message(&mut self, out: &mut VecDeque<Outgoing>, text: &str, s: &Summary) {
        let part = self.r.text_part(text, &self.logprobs);
        let mut done = self.at();
        done["text"] = text.into();
        done["logprobs"] = part["logprobs"].clone();
        self.emit(out, "response.output_text.done", done);
        let mut done = self.at();
        done["part"] = part.clone();
        self.emit(out, "response.content_part.done", done);
        let item = self.r.message(item_status(s), vec![part]);
        self.emit(
            out,
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
        );
    }

    /// With tools, what a piece of the reply completed: a call's item opened, more of its
    /// arguments, or more of the answer (its message opened first).
    fn tool_event(
        &mut self,
        out: &mut VecDeque<Outgoing>,
        e: ReplyEvent,
        logprobs: &[LogprobEntry],
    ) {
        match e {
            ReplyEvent::Call { index, name } => {
                let item = self.r.call(index, &name, "", "in_progress");
                self.emit(
                    out,
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                );
            }
            ReplyEvent::Arguments { index, text } => {
                let id = self.r.call_item_id(index);
                let d = json!({"item_id": id, "output_index": index, "delta": text});
                self.emit(out, "response.function_call_arguments.delta", d);
            }
            ReplyEvent::Content(text) => {
                if !self.message_open {
                    self.open_message(out);
                    self.message_open = true;
                }
                self.delta(out, &text, logprobs);
            }
        }
    }

    /// With tools, the reply's items closed (a reply that was neither calls nor an answer, cut
    /// short early, as a message of its text).
    fn close_tool_items(&mut self, out: &mut VecDeque<Outgoing>, s: &Summary) {
        let recognized = self.reader.recognized();
        match std::mem::take(&mut self.reader).finish() {
            Reply::Content(c) => {
                if !recognized {
                    self.open_message(out);
                    let logprobs = self.logprobs.clone();
                    self.delta(out, &c, &logprobs);
                }
                self.close_message(out, &c, s);
            }
            Reply::Calls(calls) => {
                for (k, (name, arguments)) in calls.iter().enumerate() {
                    let item = self.r.call(k, name, arguments, "completed");
                    let d =
                        json!({"item_id": item["id"], "output_index": k, "arguments": arguments});
                    self.emit(out, "response.function_call_arguments.done", d);
                    self.emit(
                        out,
                        "response.output_item.done",
                        json!({"output_index": k, "item": item}),
                    );
                }
            }
        }
    }

    fn end(&mut self, out: &mut VecDeque<Outgoing>, s: &Summary) {
        if self.r.tools.is_some() {
            self.close_tool_items(out, s);
        } else {
            let text = self.text.clone();
            self.close_message(out, &text, s);
        }
        let v = self.r.response(
            "completed",
            self.r.items(&self.text, &self.logprobs, s),
            Some(s),
        );
        self.r.keep(&v);
        let kind = match v["status"].as_str() {
            Some("incomplete") => "response.incomplete",
            _ => "response.completed",
        };
        self.emit(out, kind, json!({"response": v}));
    }

    fn fail(&mut self, out: &mut VecDeque<Outgoing>, e: &ApiError) {
        let body = e.body();
        let err = &body["error"];
        self.emit(
            out,
            "error",
            json!({"code": err["code"], "message": err["message"], "param": err["param"]}),
        );
    }
}

impl Shape for ResponseStream {
    fn take(&mut self, event: Option<Event>, out: &mut VecDeque<Outgoing>) -> bool {
        match event {
            Some(Event::Text(_, t, logprobs, _)) => {
                if self.r.tools.is_some() {
                    for e in self.reader.push(&t) {
                        self.tool_event(out, e, &logprobs);
                    }
                } else {
                    self.delta(out, &t, &logprobs);
                }
                self.text.push_str(&t);
                self.logprobs.extend(logprobs);
                false
            }
            Some(Event::Done(_, s)) => {
                self.end(out, &s);
                true
            }
            Some(Event::Failed(e)) => {
                self.fail(out, &e);
                true
            }
            None => {
                self.fail(out, &ApiError::dropped());
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Finish;
    use crate::responses::render::tests::{responder, summary};

    /// Each event's name and data.
    fn events(out: VecDeque<Outgoing>) -> Vec<(String, Value)> {
        (out.into_iter())
            .map(|e| {
                (
                    e.name.unwrap().to_string(),
                    serde_json::from_str(&e.data).unwrap(),
                )
            })
            .collect()
    }

    fn run(tools: bool, pieces: &[&str], finish: Finish) -> Vec<(String, Value)> {
        let (mut s, mut out) = ResponseStream::open(responder(tools));
        for p in pieces {
            assert!(!s.take(
                Some(Event::Text(0, p.to_string(), Vec::new(), Vec::new())),
                &mut out
            ));
        }
        assert!(s.take(Some(Event::Done(0, summary(finish))), &mut out));
        let all = events(out);
        for (i, (name, data)) in all.iter().enumerate() {
            assert_eq!(data["type"], name.as_str());
            assert_eq!(data["sequence_number"], i);
        }
        all
    }

    #[test]
    fn text_streams_as_deltas_between_the_item_events() {
        let all = run(false, &["Hel", "lo"], Finish::Length);
        let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.incomplete",
            ]
        );
        assert_eq!(all[5].1["delta"], "lo");
        assert_eq!(all[6].1["text"], "Hello");
        assert_eq!(all[8].1["item"]["status"], "incomplete");
        assert_eq!(
            all[9].1["response"]["output"][0]["content"][0]["text"],
            "Hello"
        );
    }

    #[test]
    fn a_call_is_an_item_opened_filled_and_closed() {
        let reply = r#"{"tool_calls": [{"name": "f", "arguments": {"a": 1}}]}"#;
        let (head, tail) = reply.split_at(10);
        let all = run(true, &[head, tail], Finish::Stop);
        let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!(all[2].1["item"]["arguments"], "");
        assert_eq!(all[4].1["arguments"], r#"{"a":1}"#);
        let done = &all[6].1["response"];
        assert_eq!(done["output"][0]["call_id"], all[5].1["item"]["call_id"]);
        assert_eq!(done["status"], "completed");
        // An answer instead of calls is a message whose text streams.
        let all = run(true, &[r#"{"response": "Hi"}"#], Finish::Stop);
        assert_eq!(all[4].0, "response.output_text.delta");
        assert_eq!(all[4].1["delta"], "Hi");
    }

    /// A call's item opens once its name is read, and its arguments stream in deltas that add up
    /// to the final arguments, before the reply ends.
    #[test]
    fn arguments_stream_as_they_are_generated() {
        let pieces = [
            r#"{"tool_calls": [{"name": "f", "#,
            r#""arguments": {"city""#,
            r#": "Paris"}}]}"#,
        ];
        let all = run(true, &pieces, Finish::Stop);
        let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[2], "response.output_item.added", "{names:?}");
        let deltas: Vec<&str> = (all.iter())
            .filter(|(n, _)| n == "response.function_call_arguments.delta")
            .map(|(_, d)| d["delta"].as_str().unwrap())
            .collect();
        assert_eq!(deltas, [r#"{"city""#, r#":"Paris"}"#]);
        let done = all
            .iter()
            .find(|(n, _)| n == "response.function_call_arguments.done")
            .unwrap();
        assert_eq!(done.1["arguments"], deltas.concat());
        assert_eq!(
            all.last().unwrap().1["response"]["output"][0]["arguments"],
            deltas.concat()
        );
    }

    #[test]
    fn a_failure_is_an_error_event_that_ends_the_stream() {
        let (mut s, mut out) = ResponseStream::open(responder(false));
        let e = ApiError::new(axum::http::StatusCode::GATEWAY_TIMEOUT, "too slow");
        assert!(s.take(Some(Event::Failed(e)), &mut out));
        let all = events(out);
        let (name, data) = all.last().unwrap();
        assert_eq!(
            (name.as_str(), data["message"].as_str()),
            ("error", Some("too slow"))
        );
    }
}
