//! The responses the server keeps, so that a request can continue one (`previous_response_id`)
//! and a client can read one back, list its input or delete it (`GET` / `DELETE
//! /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`). In memory, at most `capacity` of
//! them and [`MAX_BYTES`] of their JSON, the oldest dropped first, all gone when the server
//! stops: vLLM's store, bounded (OpenAI keeps them for 30 days).

use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use serde_json::Value;

/// The most the kept responses may hold, as JSON text: a bound on the memory they take whatever
/// clients send (a response with every token's 20 alternatives can take megabytes).
pub const MAX_BYTES: usize = 64 << 20;

/// One kept response.
#[derive(Debug)]
pub struct Stored {
    /// The Response object as it was answered.
    pub response: Value,
    /// Its conversation before its output, as Responses input items: what the response it
    /// continued held, then its request's `input` (its `instructions` are not carried over, as
    /// OpenAI's are not).
    pub input: Vec<Value>,
}

impl Stored {
    /// What it takes, as JSON text.
    fn bytes(&self) -> usize {
        let len = |v: &Value| serde_json::to_vec(v).map_or(0, |b| b.len());
        len(&self.response) + self.input.iter().map(len).sum::<usize>()
    }

    /// The conversation a request continuing this response starts with: its input, then its
    /// output items (a message or function calls, both valid input items).
    pub fn conversation(&self) -> Vec<Value> {
        let output = self.response["output"].as_array().into_iter().flatten();
        self.input.iter().chain(output).cloned().collect()
    }
}

/// The kept responses, by id, in the order they were kept.
#[derive(Debug, Default)]
pub struct Store {
    capacity: usize,
    max_bytes: usize,
    kept: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    /// Each response and its size.
    by_id: IndexMap<String, (Arc<Stored>, usize)>,
    bytes: usize,
}

impl Store {
    /// A store of at most `capacity` responses (0: none are kept) and [`MAX_BYTES`].
    pub fn new(capacity: usize) -> Self {
        Self::with_max_bytes(capacity, MAX_BYTES)
    }

    pub fn with_max_bytes(capacity: usize, max_bytes: usize) -> Self {
        Self {
            capacity,
            max_bytes,
            kept: Mutex::default(),
        }
    }

    /// Whether responses are kept at all.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn get(&self, id: &str) -> Option<Arc<Stored>> {
        self.lock().by_id.get(id).map(|(s, _)| s.clone())
    }

    /// Keeps `stored` under `id`, dropping the oldest kept beyond the capacity or the bytes (a
    /// response larger than all the bytes is not kept).
    pub fn put(&self, id: String, stored: Stored) {
        let size = stored.bytes();
        if !self.enabled() || size > self.max_bytes {
            return;
        }
        let mut kept = self.lock();
        if let Some((_, old)) = kept.by_id.insert(id, (Arc::new(stored), size)) {
            kept.bytes -= old;
        }
        kept.bytes += size;
        while kept.by_id.len() > self.capacity || kept.bytes > self.max_bytes {
            let (_, (_, size)) = kept
                .by_id
                .shift_remove_index(0)
                .expect("over a bound: not empty");
            kept.bytes -= size;
        }
    }

    /// Forgets `id`; whether it was kept.
    pub fn remove(&self, id: &str) -> bool {
        let mut kept = self.lock();
        match kept.by_id.shift_remove(id) {
            Some((_, size)) => {
                kept.bytes -= size;
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        // Nothing under the lock panics but on a broken invariant; a poisoned lock's map is as
        // right as it was.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(n: u64) -> Stored {
        Stored {
            response: json!({"n": n, "output": [{"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "out"}]}]}),
            input: vec![json!({"role": "user", "content": "in"})],
        }
    }

    #[test]
    fn the_oldest_go_first_beyond_the_capacity() {
        let s = Store::new(2);
        for n in 0..3 {
            s.put(format!("r{n}"), stored(n));
        }
        assert_eq!(s.len(), 2);
        assert!(s.get("r0").is_none());
        assert_eq!(s.get("r2").unwrap().response["n"], 2);
        assert!(s.remove("r1"));
        assert!(!s.remove("r1"));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_oldest_go_first_beyond_the_bytes() {
        let size = stored(0).bytes();
        let s = Store::with_max_bytes(10, 2 * size + 1);
        for n in 0..3 {
            s.put(format!("r{n}"), stored(n));
        }
        assert_eq!(s.len(), 2);
        assert!(s.get("r0").is_none());
        s.put("r1".into(), stored(1));
        assert!(s.remove("r1") && s.remove("r2") && s.is_empty());
        assert_eq!(s.lock().bytes, 0);
        let tiny = Store::with_max_bytes(10, size - 1);
        tiny.put("r".into(), stored(0));
        assert!(tiny.is_empty());
    }

    #[test]
    fn a_store_of_nothing_keeps_nothing() {
        let s = Store::new(0);
        s.put("r".into(), stored(0));
        assert!(!s.enabled() && s.is_empty());
    }

    #[test]
    fn a_conversation_is_the_input_then_the_output() {
        let c = stored(0).conversation();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0]["content"], "in");
        assert_eq!(c[1]["content"][0]["text"], "out");
    }
}
