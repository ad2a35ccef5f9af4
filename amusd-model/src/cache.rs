//! The KV cache: preallocated per request, appended in place, rolled back in O(1).

use crate::attention::KvLayout;
use crate::config::LlamaConfig;
use crate::ModelError;

/// Keys and values of every layer for positions `0..len`, laid out `[kv_head][position][head_dim]`
/// ([`KvLayout::head_major`]): attention reads one head's rows over every position, and from
/// contiguous memory the hardware prefetcher streams them (position-major, a head's rows lay
/// `kv_dim` apart and attention at 600 positions ran at a third of the memory bandwidth).
///
/// Owned by whoever drives the model and passed to [`crate::Llama::forward`] explicitly, so the
/// speculative loops can see and control exactly what is cached. Rolling back is [`KvCache::truncate`]:
/// entries past `len` are dead and are overwritten by the next forward.
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    kv_dim: usize,
    head_dim: usize,
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
            head_dim: cfg.head_dim,
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
    /// it reallocates, and moves each head's rows to their new place.
    pub fn reserve(&mut self, capacity: usize) {
        if capacity > self.capacity {
            let (old, new) = (self.layout(), KvLayout::head_major(capacity, self.head_dim));
            let used = self.len * self.head_dim;
            for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
                let mut grown = vec![0f32; capacity * self.kv_dim];
                for j in 0..self.kv_dim / self.head_dim {
                    let (from, to) = (j * old.head_stride, j * new.head_stride);
                    grown[to..to + used].copy_from_slice(&buf[from..from + used]);
                }
                *buf = grown;
            }
            self.capacity = capacity;
        }
    }

    /// Where each layer's keys and values lie.
    pub(crate) fn layout(&self) -> KvLayout {
        KvLayout::head_major(self.capacity, self.head_dim)
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
