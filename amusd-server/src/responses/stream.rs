//! A streamed response: OpenAI's named, numbered events. `response.created` and
//! `response.in_progress`; the message item and its text part opened, one
//! `response.output_text.delta` per text piece, then their `.done` events; `response.completed`
//! (or `response.incomplete`, cut by `max_output_tokens`) with the whole Response. With tools the
//! reply is held and its items (calls, with their arguments in one delta, or the answer's
//! message) go out when it ends. A failure is an `error` event, and the stream ends.

use std::collections::VecDeque;

use axum::response::sse::Event as SseEvent;
use serde_json::{json, Value};

use super::render::{item_status, Responder};
use crate::decode::{Event, LogprobEntry, Summary};
use crate::error::ApiError;
use crate::routes::Shape;
use crate::tools::{self, Reply};

pub struct ResponseStream {
    r: Responder,
    /// Every event's `sequence_number`.
    seq: u64,
    /// The reply so far and its tokens' log-probabilities.
    text: String,
    logprobs: Vec<LogprobEntry>,
}

impl ResponseStream {
    /// The stream and its opening events.
    pub fn open(r: Responder) -> (Self, VecDeque<SseEvent>) {
        let mut s = Self {
            r,
            seq: 0,
            text: String::new(),
            logprobs: Vec::new(),
        };
        let mut out = VecDeque::new();
        let started = s.r.response("in_progress", Vec::new(), None);
        s.emit(&mut out, "response.created", json!({"response": started}));
        s.emit(
            &mut out,
            "response.in_progress",
            json!({"response": started}),
        );
        if !s.r.tools {
            s.open_message(&mut out);
        }
        (s, out)
    }

    fn emit(&mut self, out: &mut VecDeque<SseEvent>, kind: &str, mut data: Value) {
        data["type"] = kind.into();
        data["sequence_number"] = self.seq.into();
        self.seq += 1;
        out.push_back(SseEvent::default().event(kind).data(data.to_string()));
    }

    /// Where the message's text part is.
    fn at(&self) -> Value {
        json!({"item_id": self.r.message_id(), "output_index": 0, "content_index": 0})
    }

    fn open_message(&mut self, out: &mut VecDeque<SseEvent>) {
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

    fn delta(&mut self, out: &mut VecDeque<SseEvent>, text: &str, logprobs: &[LogprobEntry]) {
        let mut d = self.at();
        d["delta"] = text.into();
        d["logprobs"] = self.r.logprobs_of(logprobs);
        self.emit(out, "response.output_text.delta", d);
    }

    /// The `.done` events of the message holding `text`.
    fn close_message(&mut self, out: &mut VecDeque<SseEvent>, text: &str, s: &Summary) {
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

    /// With tools, the held reply's items, each opened, filled and closed.
    fn tool_items(&mut self, out: &mut VecDeque<SseEvent>, s: &Summary) {
        let calls = match tools::read_reply(&self.text) {
            Reply::Calls(calls) => calls,
            Reply::Content(c) => {
                self.open_message(out);
                let logprobs = self.logprobs.clone();
                self.delta(out, &c, &logprobs);
                return self.close_message(out, &c, s);
            }
        };
        for (k, (name, arguments)) in calls.iter().enumerate() {
            let item = self.r.call(k, name, "", "in_progress");
            let at = json!({"item_id": item["id"], "output_index": k});
            self.emit(
                out,
                "response.output_item.added",
                json!({"output_index": k, "item": item}),
            );
            let mut d = at.clone();
            d["delta"] = arguments.as_str().into();
            self.emit(out, "response.function_call_arguments.delta", d);
            let mut d = at;
            d["arguments"] = arguments.as_str().into();
            self.emit(out, "response.function_call_arguments.done", d);
            let item = self.r.call(k, name, arguments, "completed");
            self.emit(
                out,
                "response.output_item.done",
                json!({"output_index": k, "item": item}),
            );
        }
    }

    fn end(&mut self, out: &mut VecDeque<SseEvent>, s: &Summary) {
        if self.r.tools {
            self.tool_items(out, s);
        } else {
            let text = self.text.clone();
            self.close_message(out, &text, s);
        }
        let v = self.r.response(
            "completed",
            self.r.items(&self.text, &self.logprobs, s),
            Some(s),
        );
        let kind = match v["status"].as_str() {
            Some("incomplete") => "response.incomplete",
            _ => "response.completed",
        };
        self.emit(out, kind, json!({"response": v}));
    }

    fn fail(&mut self, out: &mut VecDeque<SseEvent>, e: &ApiError) {
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
    fn take(&mut self, event: Option<Event>, out: &mut VecDeque<SseEvent>) -> bool {
        match event {
            Some(Event::Text(_, t, logprobs)) => {
                if !self.r.tools {
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
                let e = ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "the decode thread dropped the request",
                );
                self.fail(out, &e);
                true
            }
        }
    }
}
