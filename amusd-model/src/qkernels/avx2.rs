//! The AVX2 kernels. Lane = output row: a 256-bit vector holds four quant bytes of each of eight rows, multiplied
//! by the same four activation bytes broadcast to every lane.

use std::arch::x86_64::*;

use super::{prefetch, tiled, IntPacked, Kind, OutRows, QuantActs, Tile, QK, ROWS};

/// Activation rows per tile: what the registers hold (see [`super::TILE`]).
const HEIGHT: usize = 4;

/// Tiles of at most this many rows walk a panel block by block, both halves of each, so the
/// panel streams from memory in one pass. Taller tiles walk each half in turn (see [`block_q8`]
/// on why), reading the panel a second time from cache; with one or two rows that second pass
/// left the memory idle, and the draft's one-token forward read 10-11 GB/s where the core reads
/// 17-19 (`N=131072 K=1024 MS=1,2 int_probe`, three rounds alternating: 10.4-12.8 -> 15.8-19.2
/// GB/s at one row, 10.1-12.4 -> 14.2-18.2 at two).
const BLOCK_MAJOR_MAX: usize = 2;

/// # Safety
/// The CPU must have AVX2, FMA and F16C; `a` must hold `m` rows of `w.cols()` values and `y`
/// `m * w.rows()` outputs.
pub unsafe fn matmul(a: &QuantActs, m: usize, w: &IntPacked, y: &mut [f32]) {
    tiled(a, m, w, y, tile_of, HEIGHT)
}

/// [`QuantActs::quantize_block`] for every block of `x`, 32 values (four vectors) at a time: the
/// same maximum (`vmaxps` with the running maximum second ignores a NaN as `f32::max` does; max is
/// exact, so the lanes' order cannot change it), the same scale and reciprocal, the same product,
/// clamped to -128..=127 as Rust's `as i8` saturates (clamping at integers commutes with the
/// rounding), NaN to 0 as `as i8` gives, then rounded half to even by the conversion (the default
/// rounding mode).
///
/// # Safety
/// The CPU must have AVX2; `a` holds `x.len() / QK` blocks.
#[target_feature(enable = "avx2")]
pub unsafe fn quantize(x: &[f32], a: &mut QuantActs) {
    let blocks = x.len() / QK;
    assert!(a.q.len() >= blocks * QK && a.d.len() >= blocks && a.s.len() >= blocks);
    assert!(a.ds.len() >= blocks);
    let sign = _mm256_set1_ps(-0.0);
    let (low, high) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    // packs interleaves the 128-bit halves; this puts the four vectors' bytes back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..blocks {
        let xs = x.as_ptr().add(b * QK);
        let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(xs.add(8 * j)));
        let m = (v.iter()).fold(_mm256_setzero_ps(), |m, &v| {
            _mm256_max_ps(_mm256_andnot_ps(sign, v), m)
        });
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let q = v.map(|v| {
            // `max(c, p)` and `min(c, p)` return a NaN `p`; the ordered mask then zeroes it.
            let p = _mm256_min_ps(high, _mm256_max_ps(low, _mm256_mul_ps(v, id)));
            let p = _mm256_and_ps(p, _mm256_cmp_ps::<_CMP_ORD_Q>(p, p));
            _mm256_cvtps_epi32(p)
        });
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let out = a.q.as_mut_ptr().add(b * QK);
        _mm256_storeu_si256(out.cast(), _mm256_permutevar8x32_epi32(bytes, order));
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let sum = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256::<1>(sum),
        );
        let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
        let s = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32::<1>(sum)));
        (a.d[b], a.s[b], a.ds[b]) = (d, s, d * s as f32);
    }
}

/// [`tile`] for `t` rows.
///
/// # Safety
/// As [`tile`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_of(
    w: &IntPacked,
    panel: *const u8,
    a: &QuantActs,
    i0: usize,
    t: usize,
    out: OutRows,
) {
    match t {
        4 => tile::<4>(w, panel, a, i0, out),
        3 => tile::<3>(w, panel, a, i0, out),
        2 => tile::<2>(w, panel, a, i0, out),
        _ => tile::<1>(w, panel, a, i0, out),
    }
}

/// # Safety
/// As [`matmul`]; `panel` points to a whole panel of `w`, rows `i0..i0 + T` exist in `a`, and
/// `out` has `T` rows of `ROWS` writable floats.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const T: usize>(
    w: &IntPacked,
    panel: *const u8,
    a: &QuantActs,
    i0: usize,
    out: OutRows,
) {
    let (nb, rows) = (a.nb, Tile::<T>::new(a, i0));
    let acc = match w.kind {
        Kind::Q8_0 => panel_q8::<T>(panel, nb, &rows),
        Kind::Q4_0 => panel_q4::<T, false, false, false>(panel, nb, &rows),
        Kind::Q4_1 => panel_q4::<T, true, false, false>(panel, nb, &rows),
        Kind::Q4_1S8 => panel_q4::<T, true, true, false>(panel, nb, &rows),
        Kind::Q5_0 => panel_q4::<T, false, false, true>(panel, nb, &rows),
        Kind::Q5_1 => panel_q4::<T, true, false, true>(panel, nb, &rows),
    };
    for (t, (low, high)) in acc[0].iter().zip(&acc[1]).enumerate() {
        let o = out.at.add(t * out.stride);
        _mm256_storeu_ps(o, *low);
        _mm256_storeu_ps(o.add(8), *high);
    }
}

/// Four activation quants at `p`, broadcast to every 32-bit lane.
///
/// # Safety
/// `p` must point to four readable bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bcast4(p: *const i8) -> __m256i {
    _mm256_set1_epi32(p.cast::<i32>().read_unaligned())
}

/// The f16 scales of 8 rows at `p`, widened.
///
/// # Safety
/// `p` must point to 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn scales8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

/// The scales and minimums of rows `8v..8v + 8` of a coded block at `p` ([`super::coded::scales`]
/// lane by lane), from their factors `fd` and `fm`.
///
/// # Safety
/// `p` must point to 32 readable bytes; `v` is 0 or 1.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn coded8(p: *const u8, v: usize, fd: __m256, fm: __m256) -> (__m256, __m256) {
    let cd = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8 * v).cast())));
    let cm = _mm_loadl_epi64(p.add(ROWS + 8 * v).cast());
    let cm = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(cm));
    let d = _mm256_mul_ps(fd, cd);
    (d, _mm256_mul_ps(d, _mm256_mul_ps(fm, cm)))
}

/// `acc + isum * (dw * dx)` per lane, fused: [`super::dot_portable`]'s step.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn combine(acc: __m256, isum: __m256i, dw: __m256, dx: f32) -> __m256 {
    _mm256_fmadd_ps(
        _mm256_cvtepi32_ps(isum),
        _mm256_mul_ps(dw, _mm256_set1_ps(dx)),
        acc,
    )
}

/// The integer sums of block `b` of eight rows of q8_0 weights (`q`: their first group of
/// quants) with each row of the tile. ggml's sign trick, `maddubs(|w|, sign(x, w))`, keeps the
/// unsigned operand at most 128, so a pair of products (at most 2 * 128 * 127) cannot saturate;
/// each step is widened to i32 at once since two steps could.
///
/// Eight rows at a time, not the panel's sixteen: sixteen rows' sums for four activation rows
/// and the weights shared by them overflow AVX2's sixteen registers. The panel kernels walk
/// each half of a panel in turn, since within one block the compiler kept the first half's
/// activation broadcasts for the second, spilling them.
///
/// # Safety
/// `q` points to a block's quants inside a panel; the CPU must have AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn block_q8<const T: usize>(q: *const u8, x: &Tile<T>, b: usize) -> [__m256i; T] {
    let ones = _mm256_set1_epi16(1);
    let mut isum = [_mm256_setzero_si256(); T];
    for g in 0..QK / 4 {
        let w = _mm256_loadu_si256(q.add(g * 4 * ROWS).cast());
        let a = _mm256_abs_epi8(w);
        for (t, sum) in isum.iter_mut().enumerate() {
            let xb = bcast4(x.q[t].add(b * QK + 4 * g));
            let p = _mm256_maddubs_epi16(a, _mm256_sign_epi8(xb, w));
            *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(p, ones));
        }
    }
    isum
}

/// [`block_q8`] for q4 nibbles (0..15), the unsigned operand: a pair of products is at most
/// 2 * 15 * 127 = 3810, so a whole block's eight steps (30480) still fit the i16 lanes and are
/// widened to i32 once per block.
///
/// # Safety
/// As [`block_q8`].
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn block_q4<const T: usize>(q: *const u8, x: &Tile<T>, b: usize) -> [__m256i; T] {
    let nibble = _mm256_set1_epi8(0x0F);
    let mut s16 = [_mm256_setzero_si256(); T];
    for g in 0..QK / 8 {
        let w = _mm256_loadu_si256(q.add(g * 4 * ROWS).cast());
        let lo = _mm256_and_si256(w, nibble);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), nibble);
        for (t, sum) in s16.iter_mut().enumerate() {
            let xl = bcast4(x.q[t].add(b * QK + 4 * g));
            let xh = bcast4(x.q[t].add(b * QK + QK / 2 + 4 * g));
            let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
            *sum = _mm256_add_epi16(*sum, p);
        }
    }
    let ones = _mm256_set1_epi16(1);
    for sum in s16.iter_mut() {
        *sum = _mm256_madd_epi16(*sum, ones);
    }
    s16
}

/// [`block_q4`] for q5 weights: `q` points to eight rows' high-bit words (lane = row, in
/// [`super::fifth_bits_word`]'s order), their nibbles follow as q4's do. A quant is at most 31,
/// so a pair of products is at most 2 * 31 * 127 = 7874: two groups' steps (31496) fit the i16
/// lanes, and are widened to i32 after every second group.
///
/// # Safety
/// As [`block_q8`].
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn block_q5<const T: usize>(q: *const u8, x: &Tile<T>, b: usize) -> [__m256i; T] {
    let (nibble, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
    let high = _mm256_loadu_si256(q.cast());
    let mut isum = [_mm256_setzero_si256(); T];
    let mut s16 = [_mm256_setzero_si256(); T];
    for g in 0..QK / 8 {
        let w = _mm256_loadu_si256(q.add((g + 1) * 4 * ROWS).cast());
        let (lo5, hi5) = fifth_bits(high, g);
        let lo = _mm256_or_si256(_mm256_and_si256(w, nibble), lo5);
        let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(w), nibble), hi5);
        for (t, sum) in s16.iter_mut().enumerate() {
            let xl = bcast4(x.q[t].add(b * QK + 4 * g));
            let xh = bcast4(x.q[t].add(b * QK + QK / 2 + 4 * g));
            let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
            *sum = _mm256_add_epi16(*sum, p);
        }
        if g % 2 == 1 {
            for (sum, s) in isum.iter_mut().zip(s16.iter_mut()) {
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(*s, ones));
                *s = _mm256_setzero_si256();
            }
        }
    }
    isum
}

/// Group `g`'s fifth bits as 0x10 or 0 in each byte of the low and high nibbles' vectors: bit `g`
/// and bit `4 + g` of each byte of `high`, each moved to bit 4 (one bit per byte is kept, so the
/// 16-bit shifts move nothing across bytes).
///
/// # Safety
/// The CPU must have AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn fifth_bits(high: __m256i, g: usize) -> (__m256i, __m256i) {
    let bit = |at: usize| _mm256_and_si256(high, _mm256_set1_epi8((1u8 << at) as i8));
    let shift = |by: usize| _mm_cvtsi32_si128(by as i32);
    (
        _mm256_sll_epi16(bit(g), shift(4 - g)),
        _mm256_srl_epi16(bit(4 + g), shift(g)),
    )
}

/// A panel of q8_0 weights times a tile: per block and half panel, [`block_q8`], then
/// [`combine`], in the order [`BLOCK_MAJOR_MAX`] says.
///
/// # Safety
/// As [`tile`]; the CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q8<const T: usize>(panel: *const u8, nb: usize, x: &Tile<T>) -> [[__m256; T]; 2] {
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
    let block_bytes = ROWS * 34;
    if T <= BLOCK_MAJOR_MAX {
        for b in 0..nb {
            let blk = panel.add(b * block_bytes);
            prefetch_block(blk, block_bytes);
            for (v, half) in acc.iter_mut().enumerate() {
                q8_step(blk, b, v, x, half);
            }
        }
        return acc;
    }
    for (v, half) in acc.iter_mut().enumerate() {
        for b in 0..nb {
            let blk = panel.add(b * block_bytes);
            if v == 0 {
                prefetch_block(blk, block_bytes);
            }
            q8_step(blk, b, v, x, half);
        }
    }
    acc
}

/// Block `b` (at `blk`) of half `v` of a q8_0 panel times a tile, into `half`.
///
/// # Safety
/// As [`tile`]; `blk` points to a whole block of the panel.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_step<const T: usize>(
    blk: *const u8,
    b: usize,
    v: usize,
    x: &Tile<T>,
    half: &mut [__m256; T],
) {
    let isum = block_q8(blk.add(2 * ROWS + 32 * v), x, b);
    let dw = scales8(blk.add(16 * v));
    for t in 0..T {
        half[t] = combine(half[t], isum[t], dw, *x.d[t].add(b));
    }
}

/// Prefetches every cache line of the block of `bytes` at `blk` ([`prefetch`]'s distance ahead).
#[inline]
fn prefetch_block(blk: *const u8, bytes: usize) {
    for line in 0..bytes.div_ceil(64) {
        prefetch(blk.wrapping_add(64 * line), false);
    }
}

/// A panel of q4_0 / q4_1 / q4_1s8 / q5_0 / q5_1 weights times a tile: [`q4_step`] for each of
/// its blocks and halves, in the order [`BLOCK_MAJOR_MAX`] says.
///
/// # Safety
/// As [`tile`]; the CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_q4<const T: usize, const MIN: bool, const CODED: bool, const FIVE: bool>(
    panel: *const u8,
    nb: usize,
    x: &Tile<T>,
) -> [[__m256; T]; 2] {
    let (scales, width) = (if MIN { 2 } else { 1 }, if CODED { 1 } else { 2 });
    let quant_bytes = if FIVE { 4 + QK / 2 } else { QK / 2 };
    let block_bytes = ROWS * (width * scales + quant_bytes);
    let factors = [0, 1].map(|v| match CODED {
        true => (
            _mm256_loadu_ps(panel.add(32 * v).cast()),
            _mm256_loadu_ps(panel.add(4 * ROWS + 32 * v).cast()),
        ),
        false => (_mm256_setzero_ps(), _mm256_setzero_ps()),
    });
    let blocks = panel.add(if CODED {
        Kind::Q4_1S8.header_bytes()
    } else {
        0
    });
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
    if T <= BLOCK_MAJOR_MAX {
        for b in 0..nb {
            let blk = blocks.add(b * block_bytes);
            prefetch_block(blk, block_bytes);
            for (v, half) in acc.iter_mut().enumerate() {
                q4_step::<T, MIN, CODED, FIVE>(blk, b, v, x, factors[v], half);
            }
        }
        return acc;
    }
    for (v, half) in acc.iter_mut().enumerate() {
        for b in 0..nb {
            let blk = blocks.add(b * block_bytes);
            if v == 0 {
                prefetch_block(blk, block_bytes);
            }
            q4_step::<T, MIN, CODED, FIVE>(blk, b, v, x, factors[v], half);
        }
    }
    acc
}

/// Block `b` (at `blk`) of half `v` of a q4 / q5 panel times a tile, into `half`: [`block_q4`] or
/// (`FIVE`) [`block_q5`], then q4_0's offset of -8 (q5_0's -16) as `- 8 * sum(x)`, or the minimum
/// as `m * d_x * sum(x)` in a second fused step. `CODED` (with `MIN`): the scales are codes
/// against the half's `factors`.
///
/// # Safety
/// As [`tile`]; `blk` points to a whole block of the panel.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_step<const T: usize, const MIN: bool, const CODED: bool, const FIVE: bool>(
    blk: *const u8,
    b: usize,
    v: usize,
    x: &Tile<T>,
    (fd, fm): (__m256, __m256),
    half: &mut [__m256; T],
) {
    let (scales, width) = (if MIN { 2 } else { 1 }, if CODED { 1 } else { 2 });
    let centre = if FIVE { 16 } else { 8 };
    let quants = blk.add(width * ROWS * scales + 32 * v);
    let isum = match FIVE {
        true => block_q5(quants, x, b),
        false => block_q4(quants, x, b),
    };
    let (dw, mw) = match (CODED, MIN) {
        (true, _) => coded8(blk, v, fd, fm),
        (false, true) => (
            scales8(blk.add(16 * v)),
            scales8(blk.add(2 * ROWS + 16 * v)),
        ),
        (false, false) => (scales8(blk.add(16 * v)), _mm256_setzero_ps()),
    };
    for t in 0..T {
        let mut isum = isum[t];
        if !MIN {
            isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(centre * *x.s[t].add(b)));
        }
        half[t] = combine(half[t], isum, dw, *x.d[t].add(b));
        if MIN {
            half[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*x.ds[t].add(b)), half[t]);
        }
    }
}
