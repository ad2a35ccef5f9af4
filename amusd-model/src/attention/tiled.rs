//! Scores over keys in tiles ([`super::KeyLayout::Tiles`]): a tile holds sixteen positions'
//! keys dimension by dimension, so one vector load is one dimension of sixteen positions and a
//! score is one FMA chain over the dimensions, with the query's element broadcast: no per-score
//! reduction, and each key vector (widened once from f16) serves every query head of its group
//! and every row of the tile. [`dot`] is the definition; the SIMD paths run its chains lane by
//! lane, so every path gives its bits.
//!
//! Scores go where the row-key paths put them: pair `j` (row `j / group`, head `first + j %
//! group`) at `scores[j * n + t]`, `n = pos + 1`. A tile is computed whole for every pair of a
//! group, so a pair whose row ends before the group's last row gets scores past its own positions
//! (never past `n`); nothing reads them.

// Register tiles are indexed by pair and tile; iterators would hide which register is which.
#![allow(clippy::needless_range_loop)]

use super::{KvElem, KEY_TILE};
#[cfg(target_arch = "x86_64")]
use super::{QueryRows, Shape};

/// Where element 0 of position `t`'s key lies from its head's start (elements `KEY_TILE` apart).
pub(super) fn offset(t: usize, head_dim: usize) -> usize {
    t / KEY_TILE * KEY_TILE * head_dim + t % KEY_TILE
}

/// Query `q`'s dot with position `t`'s key of the head starting at `keys[0]`: one fused
/// multiply-add chain over the elements in order, from zero.
pub(super) fn dot<T: KvElem>(q: &[f32], keys: &[T], t: usize) -> f32 {
    let at = offset(t, q.len());
    q.iter().enumerate().fold(0.0, |acc, (d, &x)| {
        x.mul_add(keys[at + d * KEY_TILE].widen(), acc)
    })
}

/// Up to `N` pairs of one key/value head scored together: how many, their queries and score rows
/// (the array padded with the last pair's, never used past `p`), and the tiles they need (the last
/// pair's row reaches furthest).
#[cfg(target_arch = "x86_64")]
struct Group<const N: usize> {
    p: usize,
    q: [*const f32; N],
    out: [*mut f32; N],
    tiles: usize,
    /// The key/value head's first group: the pass that streams its keys in.
    leads: bool,
}

#[cfg(target_arch = "x86_64")]
impl<const N: usize> Group<N> {
    /// The group's block from tile `tb` of the head at `keys` (`hd` wide, `n` score positions).
    ///
    /// # Safety
    /// `keys` holds tile `tb`; the group's score rows hold `n` values.
    unsafe fn block<T>(&self, keys: *const T, tb: usize, hd: usize, n: usize) -> Block<T, N> {
        Block {
            keys: keys.add(tb * KEY_TILE * hd),
            hd,
            // Only the first pass over the head streams it; later ones find it in cache.
            prefetch: self.leads,
            out: self.out.map(|o| o.add(tb * KEY_TILE)),
            valid: n - tb * KEY_TILE,
        }
    }
}

/// The pairs of the key/value head whose first query head is `first` (pair `j`: row `j / group`,
/// head `first + j % group`), `N` at a time, with their rows of `scores` (`shape.pos + 1` each;
/// the pointers are only computed here, and the caller keeps them inside `scores`).
#[cfg(target_arch = "x86_64")]
fn groups<'a, const N: usize>(
    shape: &Shape,
    rows: &'a QueryRows,
    first: usize,
    scores: &mut [f32],
) -> impl Iterator<Item = Group<N>> + 'a {
    let (hd, n, group) = (shape.head_dim, shape.pos + 1, shape.group);
    let count = rows.rows * group;
    let query = move |j: usize| {
        let (i, g) = (j / group, j % group);
        rows.q[i * rows.stride + (first + g) * hd..].as_ptr()
    };
    let base = scores.as_mut_ptr();
    (0..count).step_by(N).map(move |j0| {
        let p = (count - j0).min(N);
        let pair = |a: usize| j0 + a.min(p - 1);
        Group {
            p,
            q: std::array::from_fn(|a| query(pair(a))),
            out: std::array::from_fn(|a| base.wrapping_add(pair(a) * n)),
            tiles: (rows.first_pos + pair(N) / group + 1).div_ceil(KEY_TILE),
            leads: j0 == 0,
        }
    })
}

/// Tiles ahead of the block being scored that the AVX-512 path prefetches (128 positions): the
/// first pass over a head streams its keys once, as a one-row forward's attention does. Into L2,
/// as [`super::prefetch_position`] does and for the same reason: one row over 4000 positions of
/// an f16 cache took 5.2-5.4 ms with prefetches into L1, 4.7-4.9 into L2 (AVX2 path 6.9-7.5 ->
/// 5.6-5.8, same CPU).
#[cfg(target_arch = "x86_64")]
const AHEAD_TILES: usize = 8;

/// The AVX-512 path: up to six pairs by four tiles per block (24 accumulators and four key
/// vectors of the 32 registers), the tiles left over one at a time.
///
/// # Safety
/// AVX512F; `keys` is the key/value head `first / group`'s start and holds the tiles of
/// `shape.pos + 1` positions; `scores` holds `rows.rows * group * (shape.pos + 1)` values; every
/// query row holds its heads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn scores_avx512<T: KvElem>(
    shape: &Shape,
    rows: &QueryRows,
    first: usize,
    keys: *const T,
    scores: &mut [f32],
) {
    use std::arch::x86_64::_mm512_set1_ps;
    const TILES: usize = 4;
    let (hd, n, scale) = (shape.head_dim, shape.pos + 1, _mm512_set1_ps(shape.scale));
    for g in groups::<6>(shape, rows, first, scores) {
        let (p, q) = (g.p, g.q);
        let mut tb = 0;
        while tb < g.tiles {
            let b = if g.tiles - tb >= TILES { TILES } else { 1 };
            let at = g.block(keys, tb, hd, n);
            match (p, b) {
                (1, TILES) => avx512_block::<T, 1, TILES>(&q, &at, scale),
                (2, TILES) => avx512_block::<T, 2, TILES>(&q, &at, scale),
                (3, TILES) => avx512_block::<T, 3, TILES>(&q, &at, scale),
                (4, TILES) => avx512_block::<T, 4, TILES>(&q, &at, scale),
                (5, TILES) => avx512_block::<T, 5, TILES>(&q, &at, scale),
                (6, TILES) => avx512_block::<T, 6, TILES>(&q, &at, scale),
                (1, _) => avx512_block::<T, 1, 1>(&q, &at, scale),
                (2, _) => avx512_block::<T, 2, 1>(&q, &at, scale),
                (3, _) => avx512_block::<T, 3, 1>(&q, &at, scale),
                (4, _) => avx512_block::<T, 4, 1>(&q, &at, scale),
                (5, _) => avx512_block::<T, 5, 1>(&q, &at, scale),
                _ => avx512_block::<T, 6, 1>(&q, &at, scale),
            }
            tb += b;
        }
    }
}

/// One block of tiles for a group of pairs: where its keys start, where each pair's scores for
/// its first position go, and how many score positions remain from there (`valid`: lanes past it
/// are not stored).
#[cfg(target_arch = "x86_64")]
struct Block<T, const N: usize> {
    keys: *const T,
    hd: usize,
    prefetch: bool,
    out: [*mut f32; N],
    valid: usize,
}

/// `P` pairs by `B` tiles: the dot chains over the `hd` dimensions, then times `scale`.
///
/// # Safety
/// As [`scores_avx512`]; `at.keys` holds `B` tiles, `q[a]` `hd` floats and `at.out[a]`
/// `min(at.valid, 16 B)` floats for `a < P`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_block<T: KvElem, const P: usize, const B: usize>(
    q: &[*const f32; 6],
    at: &Block<T, 6>,
    scale: std::arch::x86_64::__m512,
) {
    use std::arch::x86_64::*;
    let tile = KEY_TILE * at.hd;
    let mut acc = [[_mm512_setzero_ps(); B]; P];
    // Each step prefetches its share of the `B` tiles `AHEAD_TILES` on, a few lines at a time.
    let lines = (B * KEY_TILE * std::mem::size_of::<T>()).div_ceil(64);
    let ahead = at.keys.wrapping_add(AHEAD_TILES * tile).cast::<u8>();
    for d in 0..at.hd {
        if at.prefetch {
            for l in 0..lines {
                // SAFETY: a prefetch neither faults nor reads architecturally.
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add((d * lines + l) * 64).cast());
            }
        }
        let k: [__m512; B] =
            std::array::from_fn(|b| T::kv_load16(at.keys.add(b * tile + d * KEY_TILE)));
        for a in 0..P {
            let x = _mm512_set1_ps(*q[a].add(d));
            for b in 0..B {
                acc[a][b] = _mm512_fmadd_ps(x, k[b], acc[a][b]);
            }
        }
    }
    for a in 0..P {
        for b in 0..B {
            let left = at.valid.saturating_sub(b * KEY_TILE);
            let (dst, v) = (at.out[a].add(b * KEY_TILE), _mm512_mul_ps(acc[a][b], scale));
            if left >= KEY_TILE {
                _mm512_storeu_ps(dst, v);
            } else if left > 0 {
                _mm512_mask_storeu_ps(dst, (1u16 << left) - 1, v);
            }
        }
    }
}

/// The AVX2 path: up to five pairs by one tile (two vectors each) per block: ten accumulators,
/// two key vectors and a broadcast of the 16 registers.
///
/// # Safety
/// As [`scores_avx512`], with AVX2, FMA and F16C instead of AVX512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scores_avx2<T: KvElem>(
    shape: &Shape,
    rows: &QueryRows,
    first: usize,
    keys: *const T,
    scores: &mut [f32],
) {
    use std::arch::x86_64::_mm256_set1_ps;
    let (hd, n, scale) = (shape.head_dim, shape.pos + 1, _mm256_set1_ps(shape.scale));
    for g in groups::<5>(shape, rows, first, scores) {
        let (p, q) = (g.p, g.q);
        for tb in 0..g.tiles {
            let at = g.block(keys, tb, hd, n);
            match p {
                1 => avx2_block::<T, 1>(&q, &at, scale),
                2 => avx2_block::<T, 2>(&q, &at, scale),
                3 => avx2_block::<T, 3>(&q, &at, scale),
                4 => avx2_block::<T, 4>(&q, &at, scale),
                _ => avx2_block::<T, 5>(&q, &at, scale),
            }
        }
    }
}

/// `P` pairs by one tile, as [`avx512_block`] with the tile in two 8-lane halves.
///
/// # Safety
/// As [`scores_avx2`]; `at.keys` holds a tile, `q[a]` `hd` floats and `at.out[a]`
/// `min(at.valid, 16)` floats for `a < P`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_block<T: KvElem, const P: usize>(
    q: &[*const f32; 5],
    at: &Block<T, 5>,
    scale: std::arch::x86_64::__m256,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; P];
    let lines = (KEY_TILE * std::mem::size_of::<T>()).div_ceil(64);
    let ahead = at
        .keys
        .wrapping_add(AHEAD_TILES * KEY_TILE * at.hd)
        .cast::<u8>();
    for d in 0..at.hd {
        if at.prefetch {
            for l in 0..lines {
                // SAFETY: a prefetch neither faults nor reads architecturally.
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add((d * lines + l) * 64).cast());
            }
        }
        let row = at.keys.add(d * KEY_TILE);
        let k = [T::kv_load8(row), T::kv_load8(row.add(8))];
        for a in 0..P {
            let x = _mm256_set1_ps(*q[a].add(d));
            for h in 0..2 {
                acc[a][h] = _mm256_fmadd_ps(x, k[h], acc[a][h]);
            }
        }
    }
    for a in 0..P {
        let mut lanes = [0f32; KEY_TILE];
        for h in 0..2 {
            _mm256_storeu_ps(lanes[8 * h..].as_mut_ptr(), _mm256_mul_ps(acc[a][h], scale));
        }
        let left = at.valid.min(KEY_TILE);
        std::ptr::copy_nonoverlapping(lanes.as_ptr(), at.out[a], left);
    }
}
