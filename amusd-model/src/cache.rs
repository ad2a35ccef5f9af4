//! The KV cache: preallocated per request, appended in place, rolled back in O(1).

use crate::config::LlamaConfig;
use crate::ModelError;

/// Keys and values of every layer for positions `0..len`, laid out `[position][kv_head][head_dim]`.
///
/// Owned by whoever drives the model and passed to [`crate::Llama::forward`] explicitly, so the
/// speculative loops can see and control exactly what is cached. Rolling back is [`KvCache::truncate`]:
/// entries past `len` are dead and are overwritten by the next forward.
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_dim: usize,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache for `capacity` positions. The memory is zero-initialised by the allocator, so pages are
    /// only committed as positions are written.
    pub fn new(cfg: &LlamaConfig, capacity: usize) -> Self {
        let kv_dim = cfg.kv_dim();
        Self {
            keys: (0..cfg.n_layers)
                .map(|_| vec![0f32; capacity * kv_dim])
                .collect(),
            values: (0..cfg.n_layers)
                .map(|_| vec![0f32; capacity * kv_dim])
                .collect(),
            kv_dim,
            len: 0,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position from `len` on. O(1): nothing is moved or freed.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Grows the cache to hold `capacity` positions, keeping what is cached. Call between requests:
    /// it reallocates.
    pub fn reserve(&mut self, capacity: usize) {
        if capacity > self.capacity {
            for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
                buf.resize(capacity * self.kv_dim, 0.0);
            }
            self.capacity = capacity;
        }
    }

    pub(crate) fn check_room(&self, start: usize, n: usize) -> Result<(), ModelError> {
        if start > self.len {
            return Err(ModelError::Shape(format!(
                "forward at position {start} but only {} positions are cached",
                self.len
            )));
        }
        if start + n > self.capacity {
            return Err(ModelError::ContextOverflow {
                tokens: start + n,
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Keys and values of `layer`, mutable, for the forward pass to append to and attend over.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.keys[layer], &mut self.values[layer])
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity);
        self.len = len;
    }
}
