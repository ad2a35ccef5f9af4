//! The AVX-512 attention tile. A *pair* is one query row's head that reads a given key/value head;
//! a tile of `m` rows has `m * group` pairs per key/value head. Pairs go four at a time: each key
//! and value vector is loaded (and, from an f16 cache, widened) once for four pairs instead of once
//! per pair, and the sixteen dots of four pairs at four positions finish in one transposing
//! reduction (45 shuffles and adds) instead of four (about 23 each). Per output the operations are
//! the reference's: each dot is [`crate::kernels::dot`]'s 16 lane chains and pairwise tree, times
//! the scale; then the softmax; `p = s * inv`; and one FMA chain over positions in order.

// Register tiles are indexed by pair, position and vector; iterators would hide which is which.
#![allow(clippy::needless_range_loop)]

use super::{
    dot_widened, prefetch_position, softmax_in_place, KeyLayout, KvElem, QueryRows, Shape, AHEAD,
};
use std::arch::x86_64::*;

/// Lanes of a vector, and of [`crate::kernels::dot`]'s chains.
const LANES: usize = 16;

/// Pairs per pass: sixteen dot accumulators (four pairs at four positions) or sixteen weighted-sum
/// accumulators (four pairs, 64 columns), with the four shared key or value vectors, fit the 32
/// registers.
const PAIRS: usize = 4;

/// Positions per block of the weighted sums: the block's values (32 x 256 bytes for 64-wide heads)
/// stay in L1 while every group of pairs reads them.
const BLOCK: usize = 32;

/// Whether this path takes heads of `head_dim` on this CPU.
pub fn usable(head_dim: usize) -> bool {
    head_dim > 0 && head_dim.is_multiple_of(LANES) && is_x86_feature_detected!("avx512f")
}

/// Which query row and head pair `j` is, and where its query, output and scores are.
struct Pairs<'a> {
    shape: &'a Shape,
    rows: &'a QueryRows<'a>,
    /// The first query head of the key/value head.
    first: usize,
}

impl Pairs<'_> {
    fn count(&self) -> usize {
        self.rows.rows * self.shape.group
    }

    fn row(&self, j: usize) -> usize {
        j / self.shape.group
    }

    /// Positions pair `j` attends to.
    fn len(&self, j: usize) -> usize {
        self.rows.first_pos + self.row(j) + 1
    }

    /// The first pair whose row attends to more than `t` positions: rows attend to one position
    /// more than the row before, so the pairs that reach a position are a suffix.
    fn first_reaching(&self, t: usize) -> usize {
        t.saturating_sub(self.rows.first_pos) * self.shape.group
    }

    /// Offset of pair `j`'s head in its row (of the query and of the output).
    fn head_offset(&self, j: usize) -> usize {
        (self.first + j % self.shape.group) * self.shape.head_dim
    }

    fn query(&self, j: usize) -> *const f32 {
        self.rows.q[self.row(j) * self.rows.stride + self.head_offset(j)..].as_ptr()
    }
}

/// Attention of the tile's rows (at most [`super::ROW_TILE`]), key/value head by key/value head.
/// Row `i` covers positions `0..=first_pos + i`.
///
/// # Safety
/// The CPU has AVX512F and `head_dim` is a multiple of 16 ([`usable`]); `shape.pos` is the last
/// row's position, and every slice has the length `shape` needs ([`Shape::check`]) for every row.
#[target_feature(enable = "avx512f")]
pub unsafe fn attend_tile<T: KvElem>(
    shape: &Shape,
    rows: &QueryRows,
    keys: &[T],
    values: &[T],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let n_max = shape.pos + 1;
    scores.resize(rows.rows * shape.group * n_max, 0.0);
    for first in (0..shape.n_heads).step_by(shape.group) {
        let pairs = Pairs { shape, rows, first };
        let kv = shape.kv_offset(0, first);
        match shape.layout.keys {
            KeyLayout::Rows => pair_scores(&pairs, keys[kv..].as_ptr(), scores),
            // SAFETY: as this function's: the head's tiles up to the last row's position exist
            // (`Shape::check`), and `scores` was sized above.
            KeyLayout::Tiles => {
                super::tiled::scores_avx512(shape, rows, first, keys[kv..].as_ptr(), scores)
            }
        }
        for (j, s) in scores.chunks_exact_mut(n_max).enumerate() {
            let s = &mut s[..pairs.len(j)];
            let inv = softmax_in_place(s);
            s.iter_mut().for_each(|p| *p *= inv);
        }
        weighted_sums(&pairs, values[kv..].as_ptr(), scores, out);
    }
}

/// Every pair's scaled scores into `scores[j * n_max..]`: four positions of four pairs at a time,
/// the positions left over (fewer than four at the end of a row) one dot at a time. Pairs go in
/// fixed groups of four; a group runs while its last pair's row reaches the four positions, and
/// the dots it takes for an earlier pair past that pair's row land only where that pair's tail
/// dots overwrite them or where nothing reads (beyond its row's positions).
///
/// # Safety
/// As [`attend_tile`]; `k` is the key/value head's position 0.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pair_scores<T: KvElem>(pairs: &Pairs, k: *const T, scores: &mut [f32]) {
    let shape = pairs.shape;
    let (hd, n_max, count) = (shape.head_dim, shape.pos + 1, pairs.count());
    let scale = _mm512_set1_ps(shape.scale);
    let quads: Vec<[*const f32; PAIRS]> = (0..count)
        .step_by(PAIRS)
        .map(|j0| std::array::from_fn(|a| pairs.query((j0 + a).min(count - 1))))
        .collect();
    let out = scores.as_mut_ptr();
    for t in (0..n_max / 4 * 4).step_by(4) {
        let kt = k.add(t * shape.layout.pos_stride);
        for p in 0..4 {
            prefetch_position(k, t + AHEAD + p, shape.layout.pos_stride, hd);
        }
        for g in pairs.first_reaching(t + 3) / PAIRS..quads.len() {
            let (j0, q) = (g * PAIRS, &quads[g]);
            let d = match count - j0 {
                1 => dots::<T, 1>(q, kt, shape.layout.pos_stride, hd),
                2 => dots::<T, 2>(q, kt, shape.layout.pos_stride, hd),
                3 => dots::<T, 3>(q, kt, shape.layout.pos_stride, hd),
                _ => dots::<T, 4>(q, kt, shape.layout.pos_stride, hd),
            };
            let d = _mm512_mul_ps(d, scale);
            let at = |a: usize| out.add((j0 + a) * n_max + t);
            _mm_storeu_ps(at(0), _mm512_castps512_ps128(d));
            if count - j0 > 1 {
                _mm_storeu_ps(at(1), _mm512_extractf32x4_ps::<1>(d));
            }
            if count - j0 > 2 {
                _mm_storeu_ps(at(2), _mm512_extractf32x4_ps::<2>(d));
            }
            if count - j0 > 3 {
                _mm_storeu_ps(at(3), _mm512_extractf32x4_ps::<3>(d));
            }
        }
    }
    let mut widened = Vec::with_capacity(hd);
    for j in 0..count {
        let q = std::slice::from_raw_parts(pairs.query(j), hd);
        for t in pairs.len(j) / 4 * 4..pairs.len(j) {
            let key = std::slice::from_raw_parts(k.add(t * shape.layout.pos_stride), hd);
            scores[j * n_max + t] = dot_widened(q, key, &mut widened) * shape.scale;
        }
    }
}

/// The dots of `P` pairs' queries `q` with the keys of four positions from `k`, pair-major (lane
/// `4 a + p`: pair `a`, position `p`; lanes of pairs past `P` are zero).
///
/// # Safety
/// AVX512F; `q[a]` readable for `hd` floats (`a < P`), `k + p * stride` for `hd` values (`p < 4`).
#[inline(always)]
unsafe fn dots<T: KvElem, const P: usize>(
    q: &[*const f32; PAIRS],
    k: *const T,
    stride: usize,
    hd: usize,
) -> __m512 {
    let mut acc = [_mm512_setzero_ps(); 16];
    let mut c = 0;
    while c < hd {
        let keys: [__m512; 4] = std::array::from_fn(|p| T::kv_load16(k.add(p * stride + c)));
        for a in 0..P {
            let qv = _mm512_loadu_ps(q[a].add(c));
            for p in 0..4 {
                acc[4 * a + p] = _mm512_fmadd_ps(qv, keys[p], acc[4 * a + p]);
            }
        }
        c += LANES;
    }
    reduce16(acc)
}

/// [`crate::kernels::dot`]'s tree (lane `l` plus lane `l + 8`, then `+ 4`, `+ 2`, `+ 1`) for
/// sixteen dots at once: each step adds the same pairs of lanes as the single dot, after shuffles
/// that put two, four, eight, then sixteen dots side by side. Returns dot `i` in lane `i`.
///
/// # Safety
/// AVX512F.
#[inline(always)]
unsafe fn reduce16(acc: [__m512; 16]) -> __m512 {
    // l + (l + 8): dots 2j and 2j + 1 in the halves of s[j], eight lanes each.
    let s: [__m512; 8] = std::array::from_fn(|j| {
        let (a, b) = (acc[2 * j], acc[2 * j + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        )
    });
    // l + (l + 4): dots 4j .. 4j + 3 in the quarters of u[j], four lanes each.
    let u: [__m512; 4] = std::array::from_fn(|j| {
        let (a, b) = (s[2 * j], s[2 * j + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(a, b),
            _mm512_shuffle_f32x4::<0xDD>(a, b),
        )
    });
    // l + (l + 2): quarter q of w[j] holds dots 8j + q and 8j + 4 + q, two lanes each.
    let w: [__m512; 2] = std::array::from_fn(|j| {
        let (a, b) = (_mm512_castps_pd(u[2 * j]), _mm512_castps_pd(u[2 * j + 1]));
        _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        )
    });
    // l + (l + 1): lane 4q + r holds dot 4r + q.
    let z = _mm512_add_ps(
        _mm512_shuffle_ps::<0x88>(w[0], w[1]),
        _mm512_shuffle_ps::<0xDD>(w[0], w[1]),
    );
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, z)
}

/// Every pair's output `+= p[t] * v[t]` over its positions, block by block; four pairs share each
/// value load over the positions all four reach, and a pair whose row reaches further takes the
/// rest of the block alone. Each output is one FMA chain over positions in order, held in
/// registers within a pass and in `out` between passes (a stored f32 reloads exactly).
///
/// # Safety
/// As [`attend_tile`]; `v` is the key/value head's position 0; `probs` holds each pair's `s * inv`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn weighted_sums<T: KvElem>(pairs: &Pairs, v: *const T, probs: &[f32], out: &mut [f32]) {
    let shape = pairs.shape;
    let (n_max, count) = (shape.pos + 1, pairs.count());
    let width = shape.n_heads * shape.head_dim;
    let base = out.as_mut_ptr();
    let output = |j: usize| base.add(pairs.row(j) * width + pairs.head_offset(j));
    for t0 in (0..n_max).step_by(BLOCK) {
        let end = |j: usize| (t0 + BLOCK).min(pairs.len(j));
        for j0 in (pairs.first_reaching(t0)..count).step_by(PAIRS) {
            let n = (count - j0).min(PAIRS);
            let p: [*const f32; PAIRS] =
                std::array::from_fn(|a| probs[(j0 + a.min(n - 1)) * n_max..].as_ptr());
            let o: [*mut f32; PAIRS] = std::array::from_fn(|a| output(j0 + a.min(n - 1)));
            let span = Span {
                from: t0,
                to: end(j0),
                fresh: t0 == 0,
                prefetch: j0 == pairs.first_reaching(t0),
            };
            match n {
                1 => columns::<T, 1>(shape, &p, v, &o, span),
                2 => columns::<T, 2>(shape, &p, v, &o, span),
                3 => columns::<T, 3>(shape, &p, v, &o, span),
                _ => columns::<T, 4>(shape, &p, v, &o, span),
            }
            for a in (1..n).filter(|&a| end(j0 + a) > end(j0)) {
                let rest = Span {
                    from: end(j0),
                    to: end(j0 + a),
                    fresh: false,
                    prefetch: false,
                };
                columns::<T, 1>(shape, &[p[a]; PAIRS], v, &[o[a]; PAIRS], rest);
            }
        }
    }
}

/// Positions `from..to` of a weighted sum; `fresh`: the chains start there, from zero;
/// `prefetch`: this is the block's first pass over the values, which prefetches the next block's
/// (the passes after it find the block in L1).
#[derive(Clone, Copy)]
struct Span {
    from: usize,
    to: usize,
    fresh: bool,
    prefetch: bool,
}

/// [`weighted`] over the head's columns: 64 at a time, then 16.
///
/// # Safety
/// As [`weighted_sums`], for the first `P` of `p` and `o`.
#[inline(always)]
unsafe fn columns<T: KvElem, const P: usize>(
    shape: &Shape,
    p: &[*const f32; PAIRS],
    v: *const T,
    o: &[*mut f32; PAIRS],
    span: Span,
) {
    let mut col = 0;
    while col < shape.head_dim {
        let o: [*mut f32; PAIRS] = std::array::from_fn(|a| o[a].add(col));
        if shape.head_dim - col >= 64 {
            weighted::<T, P, 4>(p, v.add(col), shape.layout.pos_stride, &o, span);
            col += 64;
        } else {
            weighted::<T, P, 1>(p, v.add(col), shape.layout.pos_stride, &o, span);
            col += 16;
        }
    }
}

/// `o[a][c] += p[a][t] * v[t][c]` for `16 V` columns of `P` pairs, over the span's positions.
///
/// # Safety
/// AVX512F; `p[a]` readable at the span's positions, `v + t * stride` for `16 V` values at each,
/// `o[a]` readable and writable for `16 V` floats (`a < P`).
#[inline(always)]
unsafe fn weighted<T: KvElem, const P: usize, const V: usize>(
    p: &[*const f32; PAIRS],
    v: *const T,
    stride: usize,
    o: &[*mut f32; PAIRS],
    span: Span,
) {
    let mut acc: [[__m512; V]; P] = std::array::from_fn(|a| {
        std::array::from_fn(|c| {
            if span.fresh {
                _mm512_setzero_ps()
            } else {
                _mm512_loadu_ps(o[a].add(LANES * c))
            }
        })
    });
    for t in span.from..span.to {
        if V == 4 && span.prefetch {
            prefetch_position(v, t + AHEAD, stride, LANES * V);
        }
        let vt: [__m512; V] = std::array::from_fn(|c| T::kv_load16(v.add(t * stride + LANES * c)));
        for a in 0..P {
            let pa = _mm512_set1_ps(*p[a].add(t));
            for c in 0..V {
                acc[a][c] = _mm512_fmadd_ps(pa, vt[c], acc[a][c]);
            }
        }
    }
    for a in 0..P {
        for c in 0..V {
            _mm512_storeu_ps(o[a].add(LANES * c), acc[a][c]);
        }
    }
}
