//! The KV cache: preallocated per request, appended in place, rolled back in O(1).

use half::f16;

use crate::attention::{KvElem, KvLayout, KEY_TILE};
use crate::config::LlamaConfig;
use crate::ModelError;

/// What a cache stores its keys and values as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvPrecision {
    /// The values the model computed: the verify model's (its arithmetic defines them).
    #[default]
    F32,
    /// Rounded to f16: half the bytes for attention to read, for a draft model, whose logits only
    /// choose proposals; the keys in tiles ([`crate::attention::KeyLayout::Tiles`]), which halve
    /// the instructions of its scores.
    F16,
}

impl KvPrecision {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            _ => None,
        }
    }
}

impl std::fmt::Display for KvPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        })
    }
}

/// One layer's keys and values, as the cache stores them.
pub(crate) enum LayerKv<'a> {
    F32(&'a mut [f32], &'a mut [f32]),
    F16(&'a mut [f16], &'a mut [f16]),
}

/// Every layer's keys and values of one element type.
struct Store<T> {
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
}

impl<T: KvElem> Store<T> {
    fn new(layers: usize, len: usize) -> Self {
        Self {
            keys: (0..layers).map(|_| vec![T::default(); len]).collect(),
            values: (0..layers).map(|_| vec![T::default(); len]).collect(),
        }
    }

    /// Reallocates every buffer to `len`, moving each head's first `used` values from `old` to
    /// `new` offsets (a tiled head's keys lie in its first values too, tile by tile).
    fn grow(&mut self, len: usize, heads: usize, (old, new): (KvLayout, KvLayout), used: usize) {
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let mut grown = vec![T::default(); len];
            for j in 0..heads {
                let (from, to) = (j * old.head_stride, j * new.head_stride);
                grown[to..to + used].copy_from_slice(&buf[from..from + used]);
            }
            *buf = grown;
        }
    }
}

enum Stores {
    F32(Store<f32>),
    F16(Store<f16>),
}

/// Keys and values of every layer for positions `0..len`, laid out `[kv_head][position][head_dim]`
/// ([`KvLayout::head_major`]; an f16 cache's keys in tiles of positions within each head,
/// [`KvLayout::head_major_tiled`]): attention reads one head's rows over every position, and from
/// contiguous memory the hardware prefetcher streams them (position-major, a head's rows lay
/// `kv_dim` apart and attention at 600 positions ran at a third of the memory bandwidth).
///
/// Owned by whoever drives the model and passed to [`crate::Llama::forward`] explicitly, so the
/// speculative loops can see and control exactly what is cached. Rolling back is [`KvCache::truncate`]:
/// entries past `len` are dead and are overwritten by the next forward.
pub struct KvCache {
    store: Stores,
    kv_dim: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache for `capacity` positions. An f32 cache is zero-initialised by the allocator, so its
    /// pages are only committed as positions are written; an f16 one is written out at allocation
    /// (half the bytes; a request reserves only its own length).
    pub fn new(cfg: &LlamaConfig, capacity: usize, precision: KvPrecision) -> Self {
        let (kv_dim, layers) = (cfg.kv_dim(), cfg.n_layers);
        let len = Self::layout_of(precision, capacity, cfg.head_dim).head_stride * cfg.n_kv_heads;
        let store = match precision {
            KvPrecision::F32 => Stores::F32(Store::new(layers, len)),
            KvPrecision::F16 => Stores::F16(Store::new(layers, len)),
        };
        Self {
            store,
            kv_dim,
            head_dim: cfg.head_dim,
            len: 0,
            capacity,
        }
    }

    /// A cache whose blocks all share one block's storage (block `l` writes where block 0 does):
    /// for a pass that hands each block's keys and values out before the next block writes its
    /// own (the split prefill's helper, [`crate::BlockHook::after_block`]), at one block's memory.
    /// Only the last block written can be read back.
    pub fn one_block(cfg: &LlamaConfig, capacity: usize, precision: KvPrecision) -> Self {
        let one = LlamaConfig {
            n_layers: 1,
            ..cfg.clone()
        };
        Self::new(&one, capacity, precision)
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

    pub fn precision(&self) -> KvPrecision {
        match self.store {
            Stores::F32(_) => KvPrecision::F32,
            Stores::F16(_) => KvPrecision::F16,
        }
    }

    /// Forgets every position from `len` on. O(1): nothing is moved or freed.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Grows the cache to hold `capacity` positions, keeping what is cached. Call between requests:
    /// it reallocates, and moves each head's rows to their new place.
    pub fn reserve(&mut self, capacity: usize) {
        if capacity > self.capacity {
            let new = Self::layout_of(self.precision(), capacity, self.head_dim);
            let layouts = (self.layout(), new);
            let heads = self.kv_dim / self.head_dim;
            let len = new.head_stride * heads;
            // Whole key tiles (a tile's unused positions too), never past the old head's room.
            let used =
                (self.len.next_multiple_of(KEY_TILE) * self.head_dim).min(layouts.0.head_stride);
            match &mut self.store {
                Stores::F32(s) => s.grow(len, heads, layouts, used),
                Stores::F16(s) => s.grow(len, heads, layouts, used),
            }
            self.capacity = capacity;
        }
    }

    /// Where each layer's keys and values lie.
    pub(crate) fn layout(&self) -> KvLayout {
        Self::layout_of(self.precision(), self.capacity, self.head_dim)
    }

    /// The layout of a cache of `precision` with room for `capacity` positions: head-major, and
    /// an f16 (draft) cache's keys in tiles.
    fn layout_of(precision: KvPrecision, capacity: usize, head_dim: usize) -> KvLayout {
        match precision {
            KvPrecision::F32 => KvLayout::head_major(capacity, head_dim),
            KvPrecision::F16 => KvLayout::head_major_tiled(capacity, head_dim),
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
    pub(crate) fn layer_mut(&mut self, layer: usize) -> LayerKv<'_> {
        let at = self.slot(layer);
        match &mut self.store {
            Stores::F32(s) => LayerKv::F32(&mut s.keys[at], &mut s.values[at]),
            Stores::F16(s) => LayerKv::F16(&mut s.keys[at], &mut s.values[at]),
        }
    }

    /// Where block `layer`'s keys and values are stored: its own place, or the one place of a
    /// [`Self::one_block`] cache.
    fn slot(&self, layer: usize) -> usize {
        let blocks = match &self.store {
            Stores::F32(s) => s.keys.len(),
            Stores::F16(s) => s.keys.len(),
        };
        layer % blocks
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity);
        self.len = len;
    }

    /// Copies `layer`'s keys and values at positions `from..from + n` into `k` and `v`
    /// (`n` rows of `kv_dim`, position-major: as a forward computes them), widened to f32.
    pub fn read_positions(&self, layer: usize, from: usize, k: &mut [f32], v: &mut [f32]) {
        let (layout, hd) = (self.layout(), self.head_dim);
        assert!(k.len() == v.len() && k.len().is_multiple_of(self.kv_dim));
        assert!(from + k.len() / self.kv_dim <= self.capacity);
        let at = self.slot(layer);
        let rows = k
            .chunks_exact_mut(self.kv_dim)
            .zip(v.chunks_exact_mut(self.kv_dim));
        for (i, (kr, vr)) in rows.enumerate() {
            match &self.store {
                Stores::F32(s) => {
                    get_rows(layout, from + i, (&s.keys[at], &s.values[at]), (kr, vr), hd)
                }
                Stores::F16(s) => {
                    get_rows(layout, from + i, (&s.keys[at], &s.values[at]), (kr, vr), hd)
                }
            }
        }
    }

    /// Stores `k` and `v` (`n` rows of `kv_dim`, position-major) as `layer`'s keys and values at
    /// positions `from..from + n`, rounded to the cache's precision: how a split prefill fills in
    /// positions another process computed ([`crate::Llama::prefill_hooked`]). The positions must
    /// lie below the capacity; the cache's length is the caller's ([`Self::cover`]).
    pub fn write_positions(&mut self, layer: usize, from: usize, k: &[f32], v: &[f32]) {
        let (layout, hd, kv_dim) = (self.layout(), self.head_dim, self.kv_dim);
        assert!(k.len() == v.len() && k.len().is_multiple_of(kv_dim));
        assert!(from + k.len() / kv_dim <= self.capacity);
        let rows = k.chunks_exact(kv_dim).zip(v.chunks_exact(kv_dim));
        for (i, (kr, vr)) in rows.enumerate() {
            match self.layer_mut(layer) {
                LayerKv::F32(keys, values) => {
                    put_rows(layout, from + i, (keys, values), (kr, vr), hd)
                }
                LayerKv::F16(keys, values) => {
                    put_rows(layout, from + i, (keys, values), (kr, vr), hd)
                }
            }
        }
    }

    /// Declares positions `0..len` cached, their keys and values written (or about to be, layer
    /// by layer, before each layer reads them) by [`Self::write_positions`].
    pub fn cover(&mut self, len: usize) -> Result<(), ModelError> {
        self.check_room(0, len)?;
        self.len = len;
        Ok(())
    }
}

/// Stores one position's keys and values (`hd`-wide heads) where `layout` puts position `pos`.
pub(crate) fn put_rows<T: KvElem>(
    layout: KvLayout,
    pos: usize,
    (keys, values): (&mut [T], &mut [T]),
    (k, v): (&[f32], &[f32]),
    hd: usize,
) {
    for (j, (kh, vh)) in k.chunks_exact(hd).zip(v.chunks_exact(hd)).enumerate() {
        let (first, step) = layout.key_at(j, pos, hd);
        for (d, &x) in kh.iter().enumerate() {
            keys[first + d * step] = T::narrow(x);
        }
        let at = j * layout.head_stride + pos * layout.pos_stride;
        for (dst, &x) in values[at..at + hd].iter_mut().zip(vh) {
            *dst = T::narrow(x);
        }
    }
}

/// [`put_rows`]' inverse: position `pos`'s keys and values, widened to f32.
fn get_rows<T: KvElem>(
    layout: KvLayout,
    pos: usize,
    (keys, values): (&[T], &[T]),
    (k, v): (&mut [f32], &mut [f32]),
    hd: usize,
) {
    for (j, (kh, vh)) in k
        .chunks_exact_mut(hd)
        .zip(v.chunks_exact_mut(hd))
        .enumerate()
    {
        let (first, step) = layout.key_at(j, pos, hd);
        for (d, x) in kh.iter_mut().enumerate() {
            *x = keys[first + d * step].widen();
        }
        let at = j * layout.head_stride + pos * layout.pos_stride;
        for (x, src) in vh.iter_mut().zip(&values[at..at + hd]) {
            *x = src.widen();
        }
    }
}
