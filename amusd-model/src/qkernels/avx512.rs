//! The AVX-512 VNNI kernels. Lane = output row, as in the AVX2 path, but a 512-bit vector holds
//! four quant bytes of each of a panel's sixteen rows, so one load feeds the whole panel, and
//! `vpdpbusd` multiplies u8 by i8 and adds four products into i32 lanes in one instruction, without
//! the i16 saturation `maddubs` has. The integer sums are the AVX2 path's exactly, and the f32
//! steps are the same per lane, so the bits are the same.
//!
//! `vpdpbusd` takes its unsigned operand first: nibbles already are; q8_0's signed weights are
//! offset by 128 (`w ^ 0x80`) and the block's `128 * sum(x)` taken back out of the exact sum.

use std::arch::x86_64::*;

use super::{prefetch, tiled, IntPacked, Kind, OutRows, QuantActs, Tile, QK, ROWS};

/// Activation rows per tile: what the registers hold (see [`super::TILE`]).
const HEIGHT: usize = 8;

/// Tiles of at most this many rows sum each block in two independent chains of `vpdpbusd` (the
/// integer sum is exact, so the split changes no bit). In one chain a block's eight dependent
/// steps at five cycles each outlast the ~14 cycles its instructions take to issue, which bounds
/// the kernel whenever the weights come from cache (an L2-resident q4_1 matrix: 50 -> 55 GB/s at
/// one row, 19 -> 22 at four). From five rows up the rows are chains enough, and a second set of
/// sums would spill registers.
const SPLIT_ROWS: usize = 4;

/// Tiles of at most this many rows (all split, so the high nibbles' sums are kept apart) take the
/// high nibbles in place, as `16 q`: `vpdpbusd` of bytes up to 240 by quants of magnitude at most
/// 127 sums to 16 times the exact sum, which an arithmetic shift by four returns exactly. That
/// saves a shift and a mask per 64 bytes of weights and costs a shift per row and block: fewer
/// instructions up to three rows.
const SHIFTED_ROWS: usize = 3;

/// [`QuantActs::quantize_block`] for every block of `x`, 32 values (two vectors) at a time: the
/// same maximum (`vmaxps` with the running maximum second ignores a NaN as `f32::max` does), the
/// same scale and reciprocal, the same product, clamped to -128..=127 as Rust's `as i8` saturates
/// (a subnormal maximum's reciprocal overflows, making the products infinite; clamping at integers
/// commutes with the rounding), NaN to 0 as `as i8` gives, then rounded half to even by the
/// conversion (the default rounding mode). The quants then lie in -128..=127, so keeping each
/// one's low byte is exact. (The same steps as the AVX2 quantizer, which the tests run here.)
///
/// # Safety
/// The CPU must have AVX512F and AVX512BW; `a` holds `x.len() / QK` blocks.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize(x: &[f32], a: &mut QuantActs) {
    let blocks = x.len() / QK;
    assert!(a.q.len() >= blocks * QK && a.d.len() >= blocks && a.s.len() >= blocks);
    assert!(a.ds.len() >= blocks);
    let sign = _mm512_set1_ps(-0.0);
    for b in 0..blocks {
        let xs = x.as_ptr().add(b * QK);
        let (v0, v1) = (_mm512_loadu_ps(xs), _mm512_loadu_ps(xs.add(16)));
        let abs = |v: __m512| _mm512_andnot_ps(sign, v);
        let m = _mm512_max_ps(abs(v1), _mm512_max_ps(abs(v0), _mm512_setzero_ps()));
        let amax = _mm512_reduce_max_ps(m);
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let (low, high) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
        let quant = |v: __m512| {
            // `max(c, p)` and `min(c, p)` return a NaN `p`; the ordered mask then zeroes it.
            let p = _mm512_min_ps(high, _mm512_max_ps(low, _mm512_mul_ps(v, id)));
            _mm512_cvtps_epi32(_mm512_maskz_mov_ps(
                _mm512_cmp_ps_mask::<_CMP_ORD_Q>(p, p),
                p,
            ))
        };
        let (q0, q1) = (quant(v0), quant(v1));
        let q = a.q.as_mut_ptr().add(b * QK);
        _mm_storeu_si128(q.cast(), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(q.add(16).cast(), _mm512_cvtepi32_epi8(q1));
        // Sign-extend the stored bytes.
        let stored = _mm512_cvtepi8_epi32(_mm_loadu_si128(q.cast()));
        let stored1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(16).cast()));
        let s = _mm512_reduce_add_epi32(_mm512_add_epi32(stored, stored1));
        (a.d[b], a.s[b], a.ds[b]) = (d, s, d * s as f32);
    }
}

/// # Safety
/// The CPU must have AVX512F, AVX512BW and AVX512-VNNI; `a` must hold `m` rows of `w.cols()`
/// values and `y` `m * w.rows()` outputs.
pub unsafe fn matmul(a: &QuantActs, m: usize, w: &IntPacked, y: &mut [f32]) {
    tiled(a, m, w, y, tile_of, HEIGHT)
}

/// [`tile`] for `t` rows.
///
/// # Safety
/// As [`tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_of(
    w: &IntPacked,
    panel: *const u8,
    a: &QuantActs,
    i0: usize,
    t: usize,
    out: OutRows,
) {
    match t {
        8 => tile::<8>(w, panel, a, i0, out),
        7 => tile::<7>(w, panel, a, i0, out),
        6 => tile::<6>(w, panel, a, i0, out),
        5 => tile::<5>(w, panel, a, i0, out),
        4 => tile::<4>(w, panel, a, i0, out),
        3 => tile::<3>(w, panel, a, i0, out),
        2 => tile::<2>(w, panel, a, i0, out),
        _ => tile::<1>(w, panel, a, i0, out),
    }
}

/// # Safety
/// As [`matmul`]; `panel` points to a whole panel of `w`, rows `i0..i0 + T` exist in `a`, and
/// `out` has `T` rows of `ROWS` writable floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
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
    for (t, row) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.at.add(t * out.stride), *row);
    }
}

/// Four activation quants at `p`, broadcast to every 32-bit lane.
///
/// # Safety
/// `p` must point to four readable bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bcast4(p: *const i8) -> __m512i {
    _mm512_set1_epi32(p.cast::<i32>().read_unaligned())
}

/// The f16 scales of the panel's 16 rows at `p`, widened.
///
/// # Safety
/// `p` must point to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn scales16(p: *const u8) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
}

/// The scales and minimums of the 16 rows of a coded block at `p` ([`super::coded::scales`]
/// lane by lane), from the panel's factors `fd` and `fm`.
///
/// # Safety
/// `p` must point to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn coded16(p: *const u8, fd: __m512, fm: __m512) -> (__m512, __m512) {
    let cd = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.cast())));
    let cm = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(ROWS).cast())));
    let d = _mm512_mul_ps(fd, cd);
    (d, _mm512_mul_ps(d, _mm512_mul_ps(fm, cm)))
}

/// `acc + isum * (dw * dx)` per lane, fused: [`super::dot_portable`]'s step.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn combine(acc: __m512, isum: __m512i, dw: __m512, dx: f32) -> __m512 {
    _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(isum),
        _mm512_mul_ps(dw, _mm512_set1_ps(dx)),
        acc,
    )
}

/// A panel of q8_0 weights times a tile: per block, eight `dpbusd` steps over the offset weights,
/// less `128 * sum(x)`, then [`combine`].
///
/// # Safety
/// As [`tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn panel_q8<const T: usize>(panel: *const u8, nb: usize, x: &Tile<T>) -> [__m512; T] {
    let block_bytes = ROWS * 34;
    let flip = _mm512_set1_epi8(-128);
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let blk = panel.add(b * block_bytes);
        for line in 0..block_bytes.div_ceil(64) {
            prefetch(blk.add(64 * line), T > 1);
        }
        let q = blk.add(2 * ROWS);
        // Even and odd steps in two dependent chains while the tile is short (see `SPLIT_ROWS`).
        let split = T <= SPLIT_ROWS;
        let mut even = [_mm512_setzero_si512(); T];
        let mut odd = [_mm512_setzero_si512(); T];
        for g in 0..QK / 4 {
            let w = _mm512_xor_si512(_mm512_loadu_si512(q.add(g * 4 * ROWS).cast()), flip);
            for t in 0..T {
                let x4 = bcast4(x.q[t].add(b * QK + 4 * g));
                let sum = if split && g % 2 == 1 {
                    &mut odd[t]
                } else {
                    &mut even[t]
                };
                *sum = _mm512_dpbusd_epi32(*sum, w, x4);
            }
        }
        let isum: [__m512i; T] = std::array::from_fn(|t| {
            if split {
                _mm512_add_epi32(even[t], odd[t])
            } else {
                even[t]
            }
        });
        let dw = scales16(blk);
        for t in 0..T {
            let isum = _mm512_sub_epi32(isum[t], _mm512_set1_epi32(128 * *x.s[t].add(b)));
            acc[t] = combine(acc[t], isum, dw, *x.d[t].add(b));
        }
    }
    acc
}

/// Group `g`'s fifth bits added to the low and high nibbles `lo` and `hi` of a q5 panel (bit `g`
/// and bit `4 + g` of each byte of its high-bit words `high`, [`super::fifth_bits_word`]'s
/// order), as 16 in the bytes whose bit is set: the AVX2 path's values, in a byte mask test and a
/// masked add (the nibbles' bit 4 is clear, so the add is an or).
///
/// # Safety
/// The CPU must have AVX512F and AVX512BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn with_fifth_bits(high: __m512i, g: usize, lo: __m512i, hi: __m512i) -> (__m512i, __m512i) {
    let sixteen = _mm512_set1_epi8(16);
    let set = |bit: usize| _mm512_test_epi8_mask(high, _mm512_set1_epi8((1u8 << bit) as i8));
    (
        _mm512_mask_add_epi8(lo, set(g), lo, sixteen),
        _mm512_mask_add_epi8(hi, set(4 + g), hi, sixteen),
    )
}

/// A panel of q4_0 / q4_1 / q4_1s8 / q5_0 / q5_1 weights times a tile: per block, the low and
/// high nibbles (`FIVE`: with their fifth bits, [`with_fifth_bits`]) of four 64-byte steps
/// through `dpbusd`, then q4_0's offset of -8 (q5_0's -16) as `- 8 * sum(x)` (`- 16 * sum(x)`),
/// or the minimum as `m * d_x * sum(x)` in a second fused step. `CODED` (with `MIN`): the scales are codes, after
/// the panel's factors.
///
/// # Safety
/// As [`tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn panel_q4<const T: usize, const MIN: bool, const CODED: bool, const FIVE: bool>(
    panel: *const u8,
    nb: usize,
    x: &Tile<T>,
) -> [__m512; T] {
    let (scales, width) = (if MIN { 2 } else { 1 }, if CODED { 1 } else { 2 });
    // A q5 block's quants start with its rows' high-bit words (one vector), then the nibbles.
    let high_bytes = if FIVE { 4 * ROWS } else { 0 };
    let block_bytes = ROWS * (width * scales + QK / 2) + high_bytes;
    let centre = if FIVE { 16 } else { 8 };
    let (fd, fm) = match CODED {
        true => (
            _mm512_loadu_ps(panel.cast()),
            _mm512_loadu_ps(panel.add(4 * ROWS).cast()),
        ),
        false => (_mm512_setzero_ps(), _mm512_setzero_ps()),
    };
    let blocks = panel.add(if CODED {
        Kind::Q4_1S8.header_bytes()
    } else {
        0
    });
    let nibble = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let blk = blocks.add(b * block_bytes);
        for line in 0..block_bytes.div_ceil(64) {
            prefetch(blk.add(64 * line), false);
        }
        let q = blk.add(width * ROWS * scales);
        let high = match FIVE {
            true => _mm512_loadu_si512(q.cast()),
            false => _mm512_setzero_si512(),
        };
        let q = q.add(high_bytes);
        // Low and high nibbles in two dependent chains while the tile is short (see `SPLIT_ROWS`).
        let split = T <= SPLIT_ROWS;
        let mut slo = [_mm512_setzero_si512(); T];
        let mut shi = [_mm512_setzero_si512(); T];
        // In place, a high nibble is 16 times itself: one mask instead of a shift and a mask per
        // vector of weights, and one shift of each row's exact sum instead (see `SHIFTED_ROWS`).
        // A q5 quant is up to 31, which does not fit a byte as 16 times itself.
        let shifted = !FIVE && T <= SHIFTED_ROWS;
        for g in 0..QK / 8 {
            let w = _mm512_loadu_si512(q.add(g * 4 * ROWS).cast());
            let lo = _mm512_and_si512(w, nibble);
            let hi = if shifted {
                _mm512_andnot_si512(nibble, w)
            } else {
                _mm512_and_si512(_mm512_srli_epi16::<4>(w), nibble)
            };
            let (lo, hi) = match FIVE {
                true => with_fifth_bits(high, g, lo, hi),
                false => (lo, hi),
            };
            for t in 0..T {
                let xl = bcast4(x.q[t].add(b * QK + 4 * g));
                let xh = bcast4(x.q[t].add(b * QK + QK / 2 + 4 * g));
                if split {
                    slo[t] = _mm512_dpbusd_epi32(slo[t], lo, xl);
                    shi[t] = _mm512_dpbusd_epi32(shi[t], hi, xh);
                } else {
                    slo[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(slo[t], lo, xl), hi, xh);
                }
            }
        }
        let isum: [__m512i; T] = std::array::from_fn(|t| match (split, shifted) {
            (true, true) => _mm512_add_epi32(slo[t], _mm512_srai_epi32::<4>(shi[t])),
            (true, false) => _mm512_add_epi32(slo[t], shi[t]),
            _ => slo[t],
        });
        let (dw, mw) = match (CODED, MIN) {
            (true, _) => coded16(blk, fd, fm),
            (false, true) => (scales16(blk), scales16(blk.add(2 * ROWS))),
            (false, false) => (scales16(blk), _mm512_setzero_ps()),
        };
        for t in 0..T {
            let mut isum = isum[t];
            if !MIN {
                isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(centre * *x.s[t].add(b)));
            }
            acc[t] = combine(acc[t], isum, dw, *x.d[t].add(b));
            if MIN {
                acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*x.ds[t].add(b)), acc[t]);
            }
        }
    }
    acc
}
