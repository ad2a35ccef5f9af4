//! The AVX2 attention tile (256-bit vectors, 16 registers): the reference's operations on the
//! same values in the same order per output. A dot's 16 lanes are two 256-bit halves, reduced by
//! the reference's tree four dots at a time; a weighted sum's lanes are independent outputs. (The
//! AVX-512 tile, [`super::avx512`], shares more work between heads and rows; it needs the 32
//! registers.)

// Register tiles are indexed by dot and vector; iterators would hide which register is which.
#![allow(clippy::needless_range_loop)]

use super::{
    dot_widened, prefetch_position, softmax_in_place, KeyLayout, KvElem, QueryRows, Shape, AHEAD,
};
use std::arch::x86_64::*;

/// The dot products' lane width: [`crate::kernels::dot`] accumulates 16 lanes.
const LANES: usize = 16;

/// Most query heads per key/value head this path takes (Llama 3 has 4, SmolLM2 3).
const MAX_GROUP: usize = 16;

/// Positions per block of the weighted sums: the block's values (32 x 256 bytes for 64-wide
/// heads) stay in L1 while every query head of the group reads them.
const BLOCK: usize = 32;

/// Whether this path takes heads of `head_dim` in groups of `group` on this CPU.
pub fn usable(head_dim: usize, group: usize) -> bool {
    head_dim > 0
        && head_dim.is_multiple_of(LANES)
        && (1..=MAX_GROUP).contains(&group)
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The query heads that share a key/value head, and the tile's rows, are done together, a few
/// positions at a time, so each key and value row comes from memory once rather than once per
/// query head and row (the cache of a layer outgrows L1 within a few dozen positions, and its
/// reads bound attention). Row `i` covers positions `0..=first_pos + i`.
///
/// # Safety
/// [`usable`] for the shape: the CPU has AVX2, FMA and F16C, `head_dim` is a multiple of 16, at
/// most [`MAX_GROUP`] query heads per key/value head; at most [`super::ROW_TILE`] rows,
/// `shape.pos` the last row's position, and every slice the length `shape` needs
/// ([`Shape::check`]) for every row.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend_tile<T: KvElem>(
    shape: &Shape,
    rows: &QueryRows,
    keys: &[T],
    values: &[T],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hd, n_max, group, m) = (shape.head_dim, shape.pos + 1, shape.group, rows.rows);
    let width = shape.n_heads * hd;
    let len = |i: usize| rows.first_pos + i + 1;
    scores.resize(m * group * n_max, 0.0);
    for first in (0..shape.n_heads).step_by(group) {
        group_scores(shape, rows, keys, first, scores);
        let mut inv = [0f32; MAX_GROUP * super::ROW_TILE];
        for (j, s) in scores.chunks_exact_mut(n_max).enumerate() {
            inv[j] = softmax_in_place(&mut s[..len(j / group)]);
        }
        let v = values.as_ptr().add(shape.kv_offset(0, first));
        for t0 in (0..n_max).step_by(BLOCK) {
            // The block's first pass over the values prefetches the next block's; the passes
            // after it find the block in L1.
            let mut prefetch = true;
            for j in (0..m * group).filter(|j| len(j / group) > t0) {
                let (i, h) = (j / group, first + j % group);
                let t1 = (t0 + BLOCK).min(len(i));
                let s = &scores[j * n_max + t0..j * n_max + t1];
                let vt = v.add(t0 * shape.layout.pos_stride);
                let o = out.as_mut_ptr().add(i * width + h * hd);
                let mut col = 0;
                while col < hd {
                    let (vc, oc, fresh) = (vt.add(col), o.add(col), t0 == 0);
                    let sums = Sums { fresh, prefetch };
                    if hd - col >= 64 {
                        weighted_sum::<T, 8>(s, inv[j], vc, shape.layout.pos_stride, oc, sums);
                        col += 64;
                    } else {
                        weighted_sum::<T, 2>(s, inv[j], vc, shape.layout.pos_stride, oc, sums);
                        col += 16;
                    }
                }
                prefetch = false;
            }
        }
    }
}

/// The scaled scores of query heads `first..first + group` (one key/value head) of every row
/// into `scores[(i * group + g) * n_max..]`, four positions at a time for all rows and heads
/// (row `i` up to its own position).
///
/// # Safety
/// As [`attend_tile`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_scores<T: KvElem>(
    shape: &Shape,
    rows: &QueryRows,
    keys: &[T],
    first: usize,
    scores: &mut [f32],
) {
    let (hd, n_max, group) = (shape.head_dim, shape.pos + 1, shape.group);
    let len = |i: usize| rows.first_pos + i + 1;
    let scale = _mm_set1_ps(shape.scale);
    let head = keys.as_ptr().add(shape.kv_offset(0, first));
    if shape.layout.keys == KeyLayout::Tiles {
        // SAFETY: as this function's: the head's tiles up to the last row's position exist
        // (`Shape::check`), and `scores` holds every pair's positions.
        return super::tiled::scores_avx2(shape, rows, first, head, scores);
    }
    for t in (0..n_max / 4 * 4).step_by(4) {
        for p in 0..4 {
            prefetch_position(head, t + AHEAD + p, shape.layout.pos_stride, hd);
        }
        let k = keys.as_ptr().add(shape.kv_offset(t, first));
        for i in (0..rows.rows).filter(|&i| t + 4 <= len(i)) {
            let q = rows.q.as_ptr().add(i * rows.stride);
            for g in 0..group {
                let qh = q.add((first + g) * hd);
                let four = dot4(qh, k, shape.layout.pos_stride, hd);
                let at = scores.as_mut_ptr().add((i * group + g) * n_max + t);
                _mm_storeu_ps(at, _mm_mul_ps(four, scale));
            }
        }
    }
    let mut widened = Vec::with_capacity(hd);
    for i in 0..rows.rows {
        for t in len(i) / 4 * 4..len(i) {
            let off = shape.kv_offset(t, first);
            for g in 0..group {
                let qh = &rows.q[i * rows.stride + (first + g) * hd..][..hd];
                scores[(i * group + g) * n_max + t] =
                    dot_widened(qh, &keys[off..off + hd], &mut widened) * shape.scale;
            }
        }
    }
}

/// Four dots of `q` with the keys at `k`, `k + stride`, ..., each with the lanes and pairwise tree
/// of [`crate::kernels::dot`]: lane `l` of the 16 is one FMA chain over elements `l, l + 16, ...`,
/// kept as two halves.
///
/// # Safety
/// AVX2, FMA and F16C; `q` readable for `hd` floats, `k + i * stride` for `hd` values, `i < 4`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4<T: KvElem>(q: *const f32, k: *const T, stride: usize, hd: usize) -> __m128 {
    let mut lo = [_mm256_setzero_ps(); 4];
    let mut hi = [_mm256_setzero_ps(); 4];
    let mut c = 0;
    while c < hd {
        let (qlo, qhi) = (_mm256_loadu_ps(q.add(c)), _mm256_loadu_ps(q.add(c + 8)));
        for i in 0..4 {
            let ki = k.add(i * stride + c);
            lo[i] = _mm256_fmadd_ps(qlo, T::kv_load8(ki), lo[i]);
            hi[i] = _mm256_fmadd_ps(qhi, T::kv_load8(ki.add(8)), hi[i]);
        }
        c += LANES;
    }
    // 16 -> 8 lanes: l + (l + 8).
    reduce4(std::array::from_fn(|i| _mm256_add_ps(lo[i], hi[i])))
}

/// The rest of [`crate::kernels::dot`]'s tree for four dots at once, from 8 lanes each: halved 4,
/// 2, 1 with the same pairs, by transposing the halves between registers, so every add is one the
/// single dot makes.
///
/// # Safety
/// AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn reduce4(s8: [__m256; 4]) -> __m128 {
    // 8 -> 4: l + (l + 4), two dots per register: [dot 0 | dot 1], [dot 2 | dot 3].
    let s01 = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(s8[0], s8[1]),
        _mm256_permute2f128_ps::<0x31>(s8[0], s8[1]),
    );
    let s23 = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(s8[2], s8[3]),
        _mm256_permute2f128_ps::<0x31>(s8[2], s8[3]),
    );
    // 4 -> 2: l + (l + 2): [d0 l0, d0 l1, d2 l0, d2 l1 | d1 l0, d1 l1, d3 l0, d3 l1].
    let s2 = _mm256_add_ps(
        _mm256_shuffle_ps::<0b01_00_01_00>(s01, s23),
        _mm256_shuffle_ps::<0b11_10_11_10>(s01, s23),
    );
    // 2 -> 1: l0 + l1: [d0, d2, d0, d2 | d1, d3, d1, d3].
    let s1 = _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(s2, s2),
        _mm256_shuffle_ps::<0b11_01_11_01>(s2, s2),
    );
    _mm_unpacklo_ps(_mm256_castps256_ps128(s1), _mm256_extractf128_ps::<1>(s1))
}

/// How [`weighted_sum`] treats its span: `fresh`, the chains start there, from zero; `prefetch`,
/// it prefetches the values [`AHEAD`] positions on (the block's first pass).
#[derive(Clone, Copy)]
struct Sums {
    fresh: bool,
    prefetch: bool,
}

/// `out[c] += sum over t of (scores[t] * inv) * v[t][c]` for `8 R` columns (from zero when
/// `fresh`), each one FMA chain over positions in order, held in registers within the block and in
/// `out` between blocks (a stored f32 reloads exactly).
///
/// # Safety
/// AVX2, FMA and F16C; `v + t * stride` readable and `out` writable for `8 R` floats, for every
/// position `t` of `scores`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_sum<T: KvElem, const R: usize>(
    scores: &[f32],
    inv: f32,
    v: *const T,
    stride: usize,
    out: *mut f32,
    sums: Sums,
) {
    let mut acc: [__m256; R] = std::array::from_fn(|r| {
        if sums.fresh {
            _mm256_setzero_ps()
        } else {
            _mm256_loadu_ps(out.add(8 * r))
        }
    });
    for (t, &s) in scores.iter().enumerate() {
        if sums.prefetch {
            prefetch_position(v, t + AHEAD, stride, 8 * R);
        }
        let p = _mm256_set1_ps(s * inv);
        let vt = v.add(t * stride);
        for (r, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(p, T::kv_load8(vt.add(8 * r)), *a);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(8 * r), *a);
    }
}
