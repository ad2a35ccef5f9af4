//! Causal attention of query rows over the cached keys and values.
//!
//! [`attend_reference`] is the definition: each head's scores are [`kernels::dot`](crate::kernels::dot)s scaled by
//! `1/sqrt(head_dim)`, the softmax is [`crate::softmax`]'s, and each output element is one
//! fused multiply-add chain over positions in order. The AVX2 and AVX-512 paths (`avx2`, `avx512`)
//! compute the same operations on the same values in the same order per output (they only share
//! loads across heads, rows and positions and keep the chains in registers), so their results have
//! the same bits, whatever the batch: the verify model's batch invariance does not depend on which
//! path runs. Chosen at run time; every path this CPU has is tested against the reference bit for
//! bit.
//!
//! The cache holds f32 or f16 values ([`KvElem`]); an f16 value widens to f32 exactly, so attention
//! over an f16 cache has the bits of attention over an f32 cache holding the same values. The
//! verify model keeps f32 (its keys and values are what its arithmetic defines); a draft may store
//! f16 and read half the bytes, which is what a one-row forward's attention is bound by.
//!
//! Keys lie in rows like the values ([`KeyLayout::Rows`], the definition above) or, in a draft's
//! cache, in tiles of sixteen positions, dimension-major ([`KeyLayout::Tiles`], module `tiled`):
//! there a score is one FMA chain over the dimensions, sixteen positions to a vector with nothing
//! to reduce, about half the instructions of a row's dot. That is another definition of the
//! scores (other bits), the same on every path and for every batch.

use crate::kernels::{dot, Widen};
use crate::softmax::softmax_in_place;

/// What a KV cache may hold: a [`Widen`] type attention can also load eight at a time.
pub trait KvElem: Widen {
    /// Rounds an f32 for storage in the cache.
    fn narrow(v: f32) -> Self;

    /// 8 consecutive values from `p`, widened.
    ///
    /// # Safety
    /// `p` must point to 8 readable values, and the CPU must have AVX2 and F16C; only ever
    /// inlined into functions that enable them.
    #[cfg(target_arch = "x86_64")]
    unsafe fn kv_load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// 16 consecutive values from `p`, widened.
    ///
    /// # Safety
    /// `p` must point to 16 readable values, and the CPU must have AVX512F; only ever inlined into
    /// functions that enable it.
    #[cfg(target_arch = "x86_64")]
    unsafe fn kv_load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    fn narrow(v: f32) -> Self {
        v
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn kv_load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable floats and AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn kv_load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees 16 readable floats and AVX512F.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl KvElem for half::f16 {
    fn narrow(v: f32) -> Self {
        half::f16::from_f32(v)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn kv_load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable f16 values (16 bytes) and F16C; the load is
        // unaligned.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn kv_load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable f16 values (32 bytes) and AVX512F; the load
        // is unaligned.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

/// `dot(q, k)` over `k` widened to f32 (exactly), through `buf`: [`dot`]'s lanes and tree.
fn dot_widened<T: KvElem>(q: &[f32], k: &[T], buf: &mut Vec<f32>) -> f32 {
    buf.clear();
    buf.extend(k.iter().map(|v| v.widen()));
    dot(q, buf)
}

/// Consecutive query rows of one forward pass: row `i` sits at position `first_pos + i` and its
/// `n_heads` heads start at `q[i * stride]`.
#[derive(Clone, Copy, Debug)]
pub struct QueryRows<'a> {
    pub q: &'a [f32],
    pub stride: usize,
    pub rows: usize,
    pub first_pos: usize,
}

impl<'a> QueryRows<'a> {
    /// Rows `range` of these, as rows of their own.
    fn slice(&self, range: std::ops::Range<usize>) -> QueryRows<'a> {
        QueryRows {
            q: &self.q[range.start * self.stride..],
            stride: self.stride,
            rows: range.len(),
            first_pos: self.first_pos + range.start,
        }
    }

    /// Row `i`'s heads, `width` values.
    fn row(&self, i: usize, width: usize) -> &'a [f32] {
        &self.q[i * self.stride..i * self.stride + width]
    }
}

/// Rows attended together: they share each key and value row while it is in L1. Eight rows of
/// three heads keep their scores in L2 up to a few thousand positions.
const ROW_TILE: usize = 8;

/// Causal attention of each query row over the cached keys and values of positions up to its own;
/// row `i`'s output goes to `out[i * n_heads * head_dim..]`.
///
/// Every row's result has the bits of [`attend`] on that row alone: the rows only share memory
/// reads, so a verify forward reads each layer's cache once per tile of `ROW_TILE` rows rather
/// than once per row. (Measured: no gain separable from this VM's drift at 300-1000 positions,
/// where the second row's reads hit L2/L3 anyway; it can only pay where the cache outgrows them.)
#[allow(clippy::too_many_arguments)]
pub fn attend_rows<T: KvElem>(
    rows: QueryRows<'_>,
    keys: &[T],
    values: &[T],
    layout: KvLayout,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let heads = (n_heads, n_kv_heads, head_dim);
    let path = Path::best(head_dim, n_heads / n_kv_heads.max(1));
    attend_rows_on(path, rows, keys, values, layout, heads, scores, out)
}

/// How many positions ahead of the one being read the SIMD scans prefetch: a one-row forward's
/// attention streams every cached key and value once, and the hardware prefetcher alone leaves it
/// at about half the core's bandwidth (it restarts at every 4 KiB page; `benches/attention.rs`).
/// 32 positions are 4-8 KiB of a 64-wide head, enough to cover the memory latency at full
/// bandwidth.
#[cfg(target_arch = "x86_64")]
const AHEAD: usize = 32;

/// Prefetches the `len` values of position `t` from `base` (`stride` values apart), into L2:
/// prefetching into L1 kept a one-row scan of an f32 cache at 15-17 GB/s, into L2 it reads
/// 21-25 (`AMUSD_BENCH_CACHES=f32 cargo bench -p amusd-model --bench attention`, Zen 4, three
/// alternating rounds: one row at 4000 positions 12.0-12.5 -> 8.8-9.7 ms, eight rows 34.6-35.0 ->
/// 31.9-32.5; the AVX2 path on the same CPU 14.5-14.8 -> 11.1-11.5 and 50.8-51.1 -> 48.0-48.4).
/// Why was not established; the likeliest cause is that a prefetch into L1 holds one of its few
/// miss buffers per line until the line arrives, and the scan's own loads queue behind them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_position<T>(base: *const T, t: usize, stride: usize, len: usize) {
    let row = base.wrapping_add(t * stride).cast::<u8>();
    crate::kernels::prefetch_range_l2(row, len * std::mem::size_of::<T>());
}

/// An implementation of [`attend_rows`]; all give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Reference,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Path {
    /// Whether this path takes heads of `head_dim` in groups of `group` on this CPU.
    fn runs(self, head_dim: usize, group: usize) -> bool {
        match self {
            Self::Reference => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::usable(head_dim, group),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => avx512::usable(head_dim),
        }
    }

    /// The fastest path that [`Self::runs`] the shape (checked per call, without allocating: std
    /// caches the feature detection).
    fn best(head_dim: usize, group: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        for path in [Self::Avx512, Self::Avx2] {
            if path.runs(head_dim, group) {
                return path;
            }
        }
        Self::Reference
    }

    /// Every path that runs the shape, slowest first (tests run them all).
    #[cfg(test)]
    fn usable(head_dim: usize, group: usize) -> Vec<Self> {
        let all = [
            Self::Reference,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512,
        ];
        all.into_iter()
            .filter(|p| p.runs(head_dim, group))
            .collect()
    }
}

/// [`attend_rows`] on `path`, which must run the shape ([`Path::runs`]).
#[allow(clippy::too_many_arguments)]
fn attend_rows_on<T: KvElem>(
    path: Path,
    rows: QueryRows<'_>,
    keys: &[T],
    values: &[T],
    layout: KvLayout,
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let width = n_heads * head_dim;
    assert!(
        out.len() >= rows.rows * width,
        "attention output shorter than its rows"
    );
    assert!(path.runs(head_dim, n_heads / n_kv_heads.max(1)));
    if path == Path::Reference {
        for i in 0..rows.rows {
            let (q, o) = (rows.row(i, width), &mut out[i * width..(i + 1) * width]);
            let (pos, heads) = (rows.first_pos + i, (n_heads, n_kv_heads, head_dim));
            attend_reference(
                q, keys, values, layout, pos, heads.0, heads.1, heads.2, scores, o,
            );
        }
        return;
    }
    for first in (0..rows.rows).step_by(ROW_TILE) {
        let tile = rows.slice(first..(first + ROW_TILE).min(rows.rows));
        let last = tile.first_pos + tile.rows - 1;
        let shape = Shape::new(last, n_heads, n_kv_heads, head_dim, layout);
        let out = &mut out[first * width..(first + tile.rows) * width];
        for i in 0..tile.rows {
            shape.check(tile.row(i, width), keys, values, &out[i * width..]);
        }
        // SAFETY: `path` runs the shape (asserted): the CPU has its features and the shape is one the
        // path takes; `check` asserted that every row's query and output, and the cache up to the
        // tile's last position, are as long as the shape needs.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match path {
                Path::Avx2 => avx2::attend_tile(&shape, &tile, keys, values, scores, out),
                Path::Avx512 => avx512::attend_tile(&shape, &tile, keys, values, scores, out),
                Path::Reference => unreachable!("handled above"),
            }
        }
    }
}

/// Causal attention of one query row over the cached keys and values of positions `0..=pos`.
///
/// `q` holds `n_heads` heads of `head_dim`; `keys`/`values` are laid out as `layout` says.
/// Each head's scores, softmax and weighted sum run over positions in order, so the result for a
/// position does not depend on which other queries share the forward pass.
#[allow(clippy::too_many_arguments)]
pub fn attend<T: KvElem>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    layout: KvLayout,
    pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let rows = QueryRows {
        q,
        stride: n_heads * head_dim,
        rows: 1,
        first_pos: pos,
    };
    attend_rows(
        rows, keys, values, layout, n_heads, n_kv_heads, head_dim, scores, out,
    );
}

/// The portable definition of [`attend`].
#[allow(clippy::too_many_arguments)]
pub fn attend_reference<T: KvElem>(
    q: &[f32],
    keys: &[T],
    values: &[T],
    layout: KvLayout,
    pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let shape = Shape::new(pos, n_heads, n_kv_heads, head_dim, layout);
    shape.check(q, keys, values, out);
    scores.resize(pos + 1, 0.0);
    let mut widened = Vec::with_capacity(head_dim);
    for h in 0..n_heads {
        let qh = &q[h * head_dim..(h + 1) * head_dim];
        for (t, s) in scores.iter_mut().enumerate() {
            *s = shape.score(qh, keys, t, h, &mut widened);
        }
        let inv = softmax_in_place(scores);
        let oh = &mut out[h * head_dim..(h + 1) * head_dim];
        oh.fill(0.0);
        for (t, &s) in scores.iter().enumerate() {
            let off = shape.kv_offset(t, h);
            let p = s * inv;
            for (o, v) in oh.iter_mut().zip(&values[off..off + head_dim]) {
                *o = p.mul_add(v.widen(), *o);
            }
        }
    }
}

/// Where one layer's cached keys and values lie: key/value head `j`'s value row for position `t`
/// starts at `j * head_stride + t * pos_stride`, and so does its key row under
/// [`KeyLayout::Rows`]. Among layouts with row keys, only addressing: they give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub head_stride: usize,
    pub pos_stride: usize,
    pub keys: KeyLayout,
}

/// How a key/value head's keys lie from its start (`j * head_stride`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyLayout {
    /// As the values: position `t`'s `head_dim` values at `t * pos_stride`. A score is
    /// [`crate::kernels::dot`] (sixteen lane chains and a pairwise tree).
    Rows,
    /// Tiles of [`KEY_TILE`] positions, each `[head_dim][KEY_TILE]`: element `d` of position `t`
    /// at `(t / KEY_TILE * head_dim + d) * KEY_TILE + t % KEY_TILE`. A score is one FMA chain over
    /// `d` in order from zero (`tiled::dot`). Rollback stays a length: a tile's later positions
    /// are simply overwritten.
    Tiles,
}

/// Positions per key tile ([`KeyLayout::Tiles`]): one 512-bit vector of f32 scores.
pub const KEY_TILE: usize = 16;

impl KvLayout {
    /// `[position][kv_head][head_dim]`: a position's heads side by side.
    pub fn position_major(n_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            head_stride: head_dim,
            pos_stride: n_kv_heads * head_dim,
            keys: KeyLayout::Rows,
        }
    }

    /// `[kv_head][position][head_dim]` with room for `capacity` positions per head: the KV cache's
    /// layout, so that attention streams each head's rows from contiguous memory.
    pub fn head_major(capacity: usize, head_dim: usize) -> Self {
        Self {
            head_stride: capacity * head_dim,
            pos_stride: head_dim,
            keys: KeyLayout::Rows,
        }
    }

    /// [`Self::head_major`] with the keys in tiles ([`KeyLayout::Tiles`]), the room rounded up to
    /// whole tiles: a draft's cache.
    pub fn head_major_tiled(capacity: usize, head_dim: usize) -> Self {
        Self {
            head_stride: capacity.next_multiple_of(KEY_TILE) * head_dim,
            pos_stride: head_dim,
            keys: KeyLayout::Tiles,
        }
    }

    /// Where element 0 of key/value head `j`'s key for position `t` lies, and how far apart its
    /// elements are.
    pub fn key_at(&self, j: usize, t: usize, head_dim: usize) -> (usize, usize) {
        let head = j * self.head_stride;
        match self.keys {
            KeyLayout::Rows => (head + t * self.pos_stride, 1),
            KeyLayout::Tiles => (head + tiled::offset(t, head_dim), KEY_TILE),
        }
    }

    /// How many values of a buffer this layout reads for `positions` positions of `n_kv_heads`
    /// heads: a key tile is read whole.
    pub fn needed(&self, positions: usize, n_kv_heads: usize, head_dim: usize) -> usize {
        if positions == 0 {
            return 0;
        }
        let rows =
            (n_kv_heads - 1) * self.head_stride + (positions - 1) * self.pos_stride + head_dim;
        match self.keys {
            KeyLayout::Rows => rows,
            KeyLayout::Tiles => {
                let tiles = (n_kv_heads - 1) * self.head_stride
                    + positions.next_multiple_of(KEY_TILE) * head_dim;
                rows.max(tiles)
            }
        }
    }
}

/// One attention call's dimensions.
struct Shape {
    pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// Query heads per key/value head.
    group: usize,
    /// Where the cache's keys and values lie.
    layout: KvLayout,
    scale: f32,
}

impl Shape {
    fn new(
        pos: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        layout: KvLayout,
    ) -> Self {
        Self {
            pos,
            n_heads,
            n_kv_heads,
            head_dim,
            group: n_heads / n_kv_heads,
            layout,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    /// Where position `t`'s key (or value) for query head `h` starts.
    fn kv_offset(&self, t: usize, h: usize) -> usize {
        t * self.layout.pos_stride + h / self.group * self.layout.head_stride
    }

    fn check<T>(&self, q: &[f32], keys: &[T], values: &[T], out: &[f32]) {
        let layout = self.layout;
        let values_layout = KvLayout {
            keys: KeyLayout::Rows,
            ..layout
        };
        let (n, nkv, hd) = (self.pos + 1, self.n_kv_heads, self.head_dim);
        let width = self.n_heads * hd;
        assert!(
            q.len() >= width
                && out.len() >= width
                && keys.len() >= layout.needed(n, nkv, hd)
                && values.len() >= values_layout.needed(n, nkv, hd),
            "attention buffers shorter than their shape"
        );
    }

    /// Query `q`'s scaled score against position `t`'s key for query head `h`, as the layout
    /// defines it.
    fn score<T: KvElem>(
        &self,
        q: &[f32],
        keys: &[T],
        t: usize,
        h: usize,
        buf: &mut Vec<f32>,
    ) -> f32 {
        let dot = match self.layout.keys {
            KeyLayout::Rows => {
                let off = self.kv_offset(t, h);
                dot_widened(q, &keys[off..off + self.head_dim], buf)
            }
            KeyLayout::Tiles => tiled::dot(q, &keys[self.kv_offset(0, h)..], t),
        };
        dot * self.scale
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod tiled;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::test_values;
    use proptest::prelude::*;

    /// [`attend`]'s signature over an f32 cache.
    type Attend = fn(
        &[f32],
        &[f32],
        &[f32],
        KvLayout,
        usize,
        usize,
        usize,
        usize,
        &mut Vec<f32>,
        &mut [f32],
    ) -> ();

    /// Keys and values of `pos + 1` positions (the same values whatever the layout: element `e` of
    /// head `j` at position `t` is drawn once), laid out head-major with `spare` unused positions
    /// per head, or position-major.
    fn cache(
        (nkv, hd, pos): (usize, usize, usize),
        seed: u64,
        head_major: Option<usize>,
    ) -> (Vec<f32>, KvLayout) {
        let layout = match head_major {
            Some(spare) => KvLayout::head_major(pos + 1 + spare, hd),
            None => KvLayout::position_major(nkv, hd),
        };
        (laid_out(layout, (nkv, hd, pos), seed, false), layout)
    }

    /// The values [`cache`] draws for `seed`, where `layout` puts them: as its keys (`keys`) or as
    /// its values. Whatever no position occupies is NaN, so a read of it shows.
    fn laid_out(
        layout: KvLayout,
        (nkv, hd, pos): (usize, usize, usize),
        seed: u64,
        keys: bool,
    ) -> Vec<f32> {
        let drawn = test_values((pos + 1) * nkv * hd, seed);
        let mut buf = vec![f32::NAN; layout.needed(pos + 1, nkv, hd)];
        for t in 0..=pos {
            for j in 0..nkv {
                let src = &drawn[(t * nkv + j) * hd..(t * nkv + j + 1) * hd];
                let (first, step) = match keys {
                    true => layout.key_at(j, t, hd),
                    false => (j * layout.head_stride + t * layout.pos_stride, 1),
                };
                for (d, &x) in src.iter().enumerate() {
                    buf[first + d * step] = x;
                }
            }
        }
        buf
    }

    /// `m` rows from position `first` over a cache whose keys lie in tiles (`spare` positions of
    /// room past the last row), through `path` together, or each row alone through the reference;
    /// f32 values, or the same values rounded to f16 (`half`).
    fn run_tiled(
        path: Option<Path>,
        heads: (usize, usize, usize),
        (first, m, spare): (usize, usize, usize),
        seed: u64,
        half: bool,
    ) -> Vec<u32> {
        match half {
            false => run_tiled_as::<f32>(path, heads, (first, m, spare), seed),
            true => run_tiled_as::<half::f16>(path, heads, (first, m, spare), seed),
        }
    }

    fn run_tiled_as<T: KvElem>(
        path: Option<Path>,
        (nh, nkv, hd): (usize, usize, usize),
        (first, m, spare): (usize, usize, usize),
        seed: u64,
    ) -> Vec<u32> {
        let last = first + m - 1;
        let layout = KvLayout::head_major_tiled(last + 1 + spare, hd);
        // A tile's positions past the last row hold stale values in a real cache: finite ones.
        let stored = |seed, keys| -> Vec<T> {
            let v = laid_out(layout, (nkv, hd, last), seed, keys);
            v.into_iter()
                .map(|x| T::narrow(if x.is_nan() { 1e4 } else { x }))
                .collect()
        };
        let (keys, values) = (stored(seed + 1, true), stored(seed + 2, false));
        let q = test_values(m * nh * hd, seed);
        attend_both(
            path,
            &q,
            nh * hd,
            (&keys, &values, layout),
            (nh, nkv, hd),
            (first, m),
        )
    }

    /// `m` query rows `stride` apart from position `first` over `cache`, through `path`
    /// together, or each row alone through [`attend_reference`]; the outputs' bits.
    fn attend_both<T: KvElem>(
        path: Option<Path>,
        q: &[f32],
        stride: usize,
        (keys, values, layout): (&[T], &[T], KvLayout),
        (nh, nkv, hd): (usize, usize, usize),
        (first, m): (usize, usize),
    ) -> Vec<u32> {
        let width = nh * hd;
        let mut out = vec![f32::NAN; m * width];
        if let Some(path) = path {
            let rows = QueryRows {
                q,
                stride,
                rows: m,
                first_pos: first,
            };
            let heads = (nh, nkv, hd);
            attend_rows_on(
                path,
                rows,
                keys,
                values,
                layout,
                heads,
                &mut Vec::new(),
                &mut out,
            );
        } else {
            for (i, o) in out.chunks_exact_mut(width).enumerate() {
                let qi = &q[i * stride..i * stride + width];
                let pos = first + i;
                attend_reference(
                    qi,
                    keys,
                    values,
                    layout,
                    pos,
                    nh,
                    nkv,
                    hd,
                    &mut Vec::new(),
                    o,
                );
            }
        }
        out.iter().map(|v| v.to_bits()).collect()
    }

    fn run_in(
        f: Attend,
        (nh, nkv, hd, pos): (usize, usize, usize, usize),
        seed: u64,
        head_major: Option<usize>,
    ) -> Vec<u32> {
        let q = test_values(nh * hd, seed);
        let (keys, layout) = cache((nkv, hd, pos), seed + 1, head_major);
        let (values, _) = cache((nkv, hd, pos), seed + 2, head_major);
        let mut out = vec![f32::NAN; nh * hd];
        f(
            &q,
            &keys,
            &values,
            layout,
            pos,
            nh,
            nkv,
            hd,
            &mut Vec::new(),
            &mut out,
        );
        out.iter().map(|v| v.to_bits()).collect()
    }

    fn run(f: Attend, shape: (usize, usize, usize, usize), seed: u64) -> Vec<u32> {
        run_in(f, shape, seed, Some(3))
    }

    /// `m` query rows from position `first` (rows `stride` apart, wider than their heads) through
    /// [`attend_rows`], or each row alone through [`attend_reference`].
    fn run_rows(
        together: Option<Path>,
        (nh, nkv, hd): (usize, usize, usize),
        (first, m): (usize, usize),
        seed: u64,
    ) -> Vec<u32> {
        let stride = nh * hd + 5;
        let q = test_values(m * stride, seed);
        let last = first + m - 1;
        let (keys, layout) = cache((nkv, hd, last), seed + 1, Some(3));
        let (values, _) = cache((nkv, hd, last), seed + 2, Some(3));
        attend_both(
            together,
            &q,
            stride,
            (&keys, &values, layout),
            (nh, nkv, hd),
            (first, m),
        )
    }

    proptest! {
        /// Rows attended together (in tiles, sharing each key and value row) have the bits of
        /// each row attended alone by the reference, across tile boundaries and ragged quads.
        #[test]
        fn rows_attended_together_have_each_rows_reference_bits(
            kv in 1usize..4, group in 1usize..6, chunks in 1usize..5, first in 0usize..50,
            m in 1usize..20, seed: u64,
        ) {
            let heads = (kv * group, kv, 16 * chunks);
            let alone = run_rows(None, heads, (first, m), seed);
            for path in Path::usable(heads.2, group) {
                prop_assert_eq!(&run_rows(Some(path), heads, (first, m), seed), &alone, "{:?}", path);
            }
        }

        #[test]
        fn the_dispatched_path_has_the_reference_bits(
            kv in 1usize..4, group in 1usize..4, chunks in 1usize..10, pos in 0usize..70, seed: u64,
        ) {
            let shape = (kv * group, kv, 16 * chunks, pos);
            prop_assert_eq!(run(attend, shape, seed), run(attend_reference, shape, seed));
        }

        #[test]
        fn the_layout_changes_no_bit(
            kv in 1usize..4, group in 1usize..4, chunks in 1usize..5, pos in 0usize..40,
            spare in 0usize..5, seed: u64,
        ) {
            let shape = (kv * group, kv, 16 * chunks, pos);
            let position_major = run_in(attend_reference, shape, seed, None);
            prop_assert_eq!(&run_in(attend_reference, shape, seed, Some(spare)), &position_major);
            prop_assert_eq!(&run_in(attend, shape, seed, Some(spare)), &position_major);
        }
    }

    proptest! {
        /// An f16 cache attends exactly as an f32 cache holding the same (widened) values, on the
        /// dispatched path as on the reference, one row or several.
        #[test]
        fn an_f16_cache_has_the_bits_of_its_values_in_f32(
            kv in 1usize..4, group in 1usize..4, chunks in 1usize..5, pos in 0usize..40,
            m in 1usize..10, seed: u64,
        ) {
            let (nh, nkv, hd) = (kv * group, kv, 16 * chunks);
            let (width, last) = (nh * hd, pos + m - 1);
            let q = test_values(m * width, seed);
            let (keys, layout) = cache((nkv, hd, last), seed + 1, Some(2));
            let (values, _) = cache((nkv, hd, last), seed + 2, Some(2));
            let half = |v: &[f32]| -> Vec<half::f16> { v.iter().map(|&x| half::f16::from_f32(x)).collect() };
            let (k16, v16) = (half(&keys), half(&values));
            let widen = |v: &[half::f16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
            let (k32, v32) = (widen(&k16), widen(&v16));
            let rows = QueryRows { q: &q, stride: width, rows: m, first_pos: pos };
            let mut b = vec![f32::NAN; m * width];
            for (i, o) in b.chunks_exact_mut(width).enumerate() {
                let qi = &q[i * width..(i + 1) * width];
                attend_reference(qi, &k32, &v32, layout, pos + i, nh, nkv, hd, &mut Vec::new(), o);
            }
            let bits = |v: &[f32]| -> Vec<u32> { v.iter().map(|x| x.to_bits()).collect() };
            for path in Path::usable(hd, group) {
                let mut a = vec![f32::NAN; m * width];
                attend_rows_on(path, rows, &k16, &v16, layout, (nh, nkv, hd), &mut Vec::new(), &mut a);
                prop_assert_eq!(bits(&a), bits(&b), "{:?}", path);
            }
            let mut c = vec![f32::NAN; width];
            attend_reference(&q[..width], &k16, &v16, layout, pos, nh, nkv, hd, &mut Vec::new(), &mut c);
            prop_assert_eq!(bits(&c), bits(&b[..width]));
        }
    }

    proptest! {
        /// Over keys in tiles every path has the reference's bits for each row, f32 or f16,
        /// across tile and row-tile boundaries.
        #[test]
        fn tiled_keys_give_the_reference_bits_on_every_path(
            kv in 1usize..4, group in 1usize..8, chunks in 1usize..5, first in 0usize..70,
            m in 1usize..20, spare in 0usize..20, half: bool, seed: u64,
        ) {
            let heads = (kv * group, kv, 16 * chunks);
            let alone = run_tiled(None, heads, (first, m, spare), seed, half);
            for path in Path::usable(heads.2, group) {
                let together = run_tiled(Some(path), heads, (first, m, spare), seed, half);
                prop_assert_eq!(&together, &alone, "{:?}", path);
            }
        }

        /// Tiled keys are the same keys: attention over them equals attention over row keys up to
        /// the rounding of a different summation order.
        #[test]
        fn tiled_keys_attend_as_row_keys_do(
            kv in 1usize..3, group in 1usize..4, chunks in 1usize..5, pos in 0usize..60, seed: u64,
        ) {
            let (nh, nkv, hd) = (kv * group, kv, 16 * chunks);
            let rows = run(attend, (nh, nkv, hd, pos), seed);
            let tiled = run_tiled(Some(Path::best(hd, group)), (nh, nkv, hd), (pos, 1, 0), seed, false);
            for (a, b) in rows.iter().zip(&tiled) {
                let (a, b) = (f32::from_bits(*a), f32::from_bits(*b));
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{} against {}", a, b);
            }
        }
    }

    #[test]
    fn a_tiled_key_lies_where_the_layout_says() {
        let layout = KvLayout::head_major_tiled(20, 4);
        assert_eq!(layout.head_stride, 32 * 4);
        // Position 17 is the second tile's second lane; element 3 three tile rows on.
        assert_eq!(layout.key_at(1, 17, 4), (128 + 64 + 1, KEY_TILE));
        assert_eq!(tiled::offset(17, 4) + 3 * KEY_TILE, 64 + 1 + 48);
        assert_eq!(layout.needed(17, 2, 4), 128 + 32 * 4);
    }

    #[test]
    fn odd_head_sizes_take_the_reference() {
        let shape = (4, 2, 12, 9);
        assert_eq!(run(attend, shape, 3), run(attend_reference, shape, 3));
    }

    #[test]
    fn attention_is_a_convex_combination_of_values() {
        let (nh, nkv, hd, pos) = (4, 2, 16, 5);
        let q = test_values(nh * hd, 1);
        let keys = test_values((pos + 1) * nkv * hd, 2);
        let values = vec![0.25f32; (pos + 1) * nkv * hd];
        let mut out = vec![0f32; nh * hd];
        attend(
            &q,
            &keys,
            &values,
            KvLayout::position_major(nkv, hd),
            pos,
            nh,
            nkv,
            hd,
            &mut Vec::new(),
            &mut out,
        );
        for v in out {
            assert!((v - 0.25).abs() < 1e-6);
        }
    }
}
