//! The responses the server keeps, so that a request can continue one (`previous_response_id`)
//! and a client can read one back, list its input or delete it (`GET` / `DELETE
//! /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`). In memory, at most `capacity` of
//! them, the oldest dropped first, all gone when the server stops: vLLM's store, bounded (OpenAI
//! keeps them for 30 days).

use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use serde_json::Value;

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
    kept: Mutex<IndexMap<String, Arc<Stored>>>,
}

impl Store {
    /// A store of at most `capacity` responses (0: none are kept).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            kept: Mutex::default(),
        }
    }

    /// Whether responses are kept at all.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn get(&self, id: &str) -> Option<Arc<Stored>> {
        self.lock().get(id).cloned()
    }

    /// Keeps `stored` under `id`, dropping the oldest kept beyond the capacity.
    pub fn put(&self, id: String, stored: Stored) {
        if !self.enabled() {
            return;
        }
        let mut kept = self.lock();
        kept.insert(id, Arc::new(stored));
        while kept.len() > self.capacity {
            kept.shift_remove_index(0);
        }
    }

    /// Forgets `id`; whether it was kept.
    pub fn remove(&self, id: &str) -> bool {
        self.lock().shift_remove(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IndexMap<String, Arc<Stored>>> {
        // A panic while holding the lock cannot leave the map half-changed (each change is one
        // IndexMap call), so a poisoned lock's map is still right.
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
