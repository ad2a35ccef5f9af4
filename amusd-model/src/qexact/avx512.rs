//! The AVX-512 kernels (AVX512F): sixteen outputs per vector, so a panel is four vectors wide and
//! each widening instruction serves twice the weights of the AVX2 path. The arithmetic is the
//! AVX2 path's lane for lane (the same f32 values of the quants, looked up or converted; the same
//! `fma(q, d, m)`; the same chain order; a k-quant's f32 scales and its split groups' second
//! scale sets as the AVX2 path reads them), so both give the portable reference's bits.

// Register tiles are indexed by row and vector; iterators would hide which register is which.
#![allow(clippy::needless_range_loop)]
use super::*;
use std::arch::x86_64::*;

/// Outputs per vector.
const LANES: usize = 16;

fn check() {
    assert!(
        Isa::Avx512.supported(),
        "AVX-512 kernel on a CPU without AVX512F"
    );
}

pub fn rows(kind: BlockKind, xs: &[&[f32]], panel: &[u8], out: &mut [f32]) {
    check();
    let k = xs[0].len();
    assert!(xs.iter().all(|x| x.len() == k) && out.len() == xs.len() * PANEL);
    assert!(k.is_multiple_of(GROUP) && panel.len() == k / GROUP * kind.group_bytes());
    // SAFETY: the CPU has AVX512F (checked); `rows_of` reads `k` values of each row, `k / GROUP`
    // groups of `panel` and writes `xs.len() * PANEL` outputs (asserted).
    unsafe { by_kind!(kind, rows_of(xs, panel, out)) }
}

/// 32 vector registers: up to five rows take the whole panel (four vectors, up to 20
/// accumulators) in one pass, reading each weight byte once; six to sixteen take a quarter of it
/// (one vector, up to 16 accumulators) per pass, so each weight is widened once, in registers, for
/// up to sixteen rows ([`Isa::direct_rows`]). Half-panel strips (two vectors) for five to eight
/// rows were slower: the verify model's forward at 300 positions (`EXACT=1 SPEC=f32 CTX=300
/// ROWS=m fwd_probe`, medians of three alternating rounds) took m = 5 22.7 / 21.8 / 22.2 ms
/// with them against 20.8 / 18.2 / 21.5 with the whole panel, and m = 6 / 7 / 8 23-25 / 27-28 /
/// 28-31 against 22-23 / 24-26 / 26-30 with quarter strips; three and four rows are fastest
/// whole (m = 4: 16.3 / 17.3 against 19.6 / 21.1 in halves).
#[target_feature(enable = "avx512f")]
unsafe fn rows_of<
    const NIB: bool,
    const OFF: bool,
    const BIAS: i32,
    const F32: bool,
    const SPLIT: bool,
>(
    xs: &[&[f32]],
    panel: &[u8],
    out: &mut [f32],
) {
    match xs.len() {
        1 => strips::<1, 4, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        2 => strips::<2, 4, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        3 => strips::<3, 4, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        4 => strips::<4, 4, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        5 => strips::<5, 4, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        6 => strips::<6, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        7 => strips::<7, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        8 => strips::<8, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        9 => strips::<9, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        10 => strips::<10, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        11 => strips::<11, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        12 => strips::<12, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        13 => strips::<13, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        14 => strips::<14, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        15 => strips::<15, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        16 => strips::<16, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        r => unreachable!("a direct tile of {r} rows"),
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn strips<
    const R: usize,
    const V: usize,
    const NIB: bool,
    const OFF: bool,
    const BIAS: i32,
    const F32: bool,
    const SPLIT: bool,
>(
    xs: &[&[f32]],
    panel: &[u8],
    out: &mut [f32],
) {
    let xs: [*const f32; R] = std::array::from_fn(|r| xs[r].as_ptr());
    let k = panel.len() / group_bytes::<NIB, OFF, F32, SPLIT>() * GROUP;
    for col in (0..PANEL).step_by(LANES * V) {
        let acc = strip::<R, V, NIB, OFF, BIAS, F32, SPLIT>(&xs, k, panel, col);
        for r in 0..R {
            for v in 0..V {
                let o = out.as_mut_ptr().add(r * PANEL + col + LANES * v);
                _mm512_storeu_ps(o, acc[r][v]);
            }
        }
    }
}

/// Columns `col .. col + 16 V` of `R` rows, every group, widening in registers. Each lane is
/// one output's accumulator and takes one FMA per reduction step, in order.
#[target_feature(enable = "avx512f")]
unsafe fn strip<
    const R: usize,
    const V: usize,
    const NIB: bool,
    const OFF: bool,
    const BIAS: i32,
    const F32: bool,
    const SPLIT: bool,
>(
    xs: &[*const f32; R],
    k: usize,
    panel: &[u8],
    col: usize,
) -> [[__m512; V]; R] {
    let gb = group_bytes::<NIB, OFF, F32, SPLIT>();
    let ahead = strip_prefetch(col, gb, panel.len());
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for g in 0..k / GROUP {
        let base = panel.as_ptr().add(g * gb);
        // Into L2, as attention's scans: the verify model's one-row forward 7.19-7.30 -> 7.01-7.08
        // ms (`EXACT=1 SPEC=f32 CTX=200 ROWS=1 TEXT=... fwd_probe`, three alternating rounds,
        // Zen 4), four and eight rows level.
        crate::kernels::prefetch_range_l2(base.wrapping_add(ahead), gb);
        let mut sc: [(__m512, __m512); V] =
            std::array::from_fn(|v| half_scales::<OFF, F32, false>(base, col + LANES * v));
        let q = base.add(scale_bytes::<OFF, F32, SPLIT>() + col);
        let p0 = g * GROUP;
        if NIB {
            for s in 0..GROUP / 2 {
                if SPLIT && s == GROUP / 4 {
                    sc = std::array::from_fn(|v| {
                        half_scales::<OFF, F32, true>(base, col + LANES * v)
                    });
                }
                for v in 0..V {
                    let at = q.add(s * PANEL + LANES * v);
                    let (wl, wh) = nibble_pair::<OFF, BIAS>(at, sc[v].0, sc[v].1);
                    for r in 0..R {
                        let x = xs[r].add(p0 + 2 * s);
                        acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(*x), wl, acc[r][v]);
                        acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(1)), wh, acc[r][v]);
                    }
                }
            }
        } else {
            for t in 0..GROUP {
                if SPLIT && t == GROUP / 2 {
                    sc = std::array::from_fn(|v| {
                        half_scales::<OFF, F32, true>(base, col + LANES * v)
                    });
                }
                for v in 0..V {
                    let w = byte::<OFF>(q.add(t * PANEL + LANES * v), sc[v].0, sc[v].1);
                    for r in 0..R {
                        let x = _mm512_set1_ps(*xs[r].add(p0 + t));
                        acc[r][v] = _mm512_fmadd_ps(x, w, acc[r][v]);
                    }
                }
            }
        }
    }
    acc
}

pub fn widen_group(kind: BlockKind, group: &[u8], wide: &mut [f32]) {
    check();
    assert!(group.len() >= kind.group_bytes() && wide.len() == GROUP * PANEL);
    // SAFETY: the CPU has AVX512F (checked); `widen_group_of` reads one group
    // (`kind.group_bytes()`, asserted) and writes `GROUP * PANEL` floats (asserted).
    unsafe { by_kind!(kind, widen_group_of(group, wide)) }
}

#[target_feature(enable = "avx512f")]
unsafe fn widen_group_of<
    const NIB: bool,
    const OFF: bool,
    const BIAS: i32,
    const F32: bool,
    const SPLIT: bool,
>(
    group: &[u8],
    wide: &mut [f32],
) {
    let (base, out) = (group.as_ptr(), wide.as_mut_ptr());
    for v in 0..PANEL / LANES {
        let (mut scale, mut offset) = half_scales::<OFF, F32, false>(base, LANES * v);
        let q = base.add(scale_bytes::<OFF, F32, SPLIT>() + LANES * v);
        let o = out.add(LANES * v);
        if NIB {
            for s in 0..GROUP / 2 {
                if SPLIT && s == GROUP / 4 {
                    (scale, offset) = half_scales::<OFF, F32, true>(base, LANES * v);
                }
                let (wl, wh) = nibble_pair::<OFF, BIAS>(q.add(s * PANEL), scale, offset);
                _mm512_storeu_ps(o.add(2 * s * PANEL), wl);
                _mm512_storeu_ps(o.add((2 * s + 1) * PANEL), wh);
            }
        } else {
            for t in 0..GROUP {
                if SPLIT && t == GROUP / 2 {
                    (scale, offset) = half_scales::<OFF, F32, true>(base, LANES * v);
                }
                let w = byte::<OFF>(q.add(t * PANEL), scale, offset);
                _mm512_storeu_ps(o.add(t * PANEL), w);
            }
        }
    }
}

/// # Safety
/// `sums` holds `m` rows.
pub unsafe fn gemm_group(x: &[f32], m: usize, k: usize, wide: &[f32], sums: SumRows) {
    check();
    assert!(x.len() >= (m - 1) * k + GROUP && wide.len() == GROUP * PANEL);
    let mut i = 0;
    while i < m {
        let r = (m - i).min(6);
        let (xs, a) = (&x[i * k..], sums.starting_at(i));
        // SAFETY: the CPU has AVX512F (checked); `tile` reads GROUP values of each of its `r`
        // rows of `x` (the last at (r - 1) k, inside `xs` by the assert above), all of `wide`,
        // and the sums of `r` rows (the caller's).
        match r {
            1 => tile::<1>(xs, k, wide, a),
            2 => tile::<2>(xs, k, wide, a),
            3 => tile::<3>(xs, k, wide, a),
            4 => tile::<4>(xs, k, wide, a),
            5 => tile::<5>(xs, k, wide, a),
            _ => tile::<6>(xs, k, wide, a),
        }
        i += r;
    }
}

/// `R` rows over the widened group, the whole panel at once: 24 accumulators and the step's four
/// weight vectors fit the 32 registers.
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize>(x: &[f32], k: usize, wide: &[f32], sums: SumRows) {
    const V: usize = PANEL / LANES;
    let w = wide.as_ptr();
    let mut s: [[__m512; V]; R] = std::array::from_fn(|r| {
        std::array::from_fn(|v| match sums.fresh {
            true => _mm512_setzero_ps(),
            false => _mm512_loadu_ps(sums.src.add(r * PANEL + LANES * v)),
        })
    });
    for t in 0..GROUP {
        let wt: [__m512; V] =
            std::array::from_fn(|v| _mm512_loadu_ps(w.add(t * PANEL + LANES * v)));
        for r in 0..R {
            let xv = _mm512_set1_ps(*x.as_ptr().add(r * k + t));
            for v in 0..V {
                s[r][v] = _mm512_fmadd_ps(xv, wt[v], s[r][v]);
            }
        }
    }
    for r in 0..R {
        for v in 0..V {
            _mm512_storeu_ps(sums.dst.add(r * sums.stride + LANES * v), s[r][v]);
        }
    }
}

/// The scales (and offsets) of columns `col .. col + 16` of the group at `base`: its first
/// half's, or with `SECOND` a split group's second half's (the sets after the first half's,
/// [`BlockKind::scale_sets`]).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn half_scales<const OFF: bool, const F32: bool, const SECOND: bool>(
    base: *const u8,
    col: usize,
) -> (__m512, __m512) {
    let first = if SECOND { 1 + OFF as usize } else { 0 };
    let scale = scale_set::<F32>(base, first, col);
    let offset = if OFF {
        scale_set::<F32>(base, first + 1, col)
    } else {
        _mm512_setzero_ps()
    };
    (scale, offset)
}

/// Columns `col .. col + 16` of the group's scale set `set` (f32, or f16 widened).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scale_set<const F32: bool>(base: *const u8, set: usize, col: usize) -> __m512 {
    if F32 {
        _mm512_loadu_ps(base.cast::<f32>().add(set * PANEL + col))
    } else {
        _mm512_cvtph_ps(_mm256_loadu_si256(
            base.cast::<u16>().add(set * PANEL + col).cast(),
        ))
    }
}

/// Two reduction steps of 16 columns from 16 bytes of nibble pairs at `q`, widened. The low
/// nibbles are looked up (`vpermps` reads an index's low four bits only, so it needs no mask, and
/// the table holds each nibble less `BIAS` as f32: what converting the integer gives), the high
/// ones shifted down and converted, or for a biased type looked up too; a lookup and a
/// conversion run on different ports.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn nibble_pair<const OFF: bool, const BIAS: i32>(
    q: *const u8,
    scale: __m512,
    offset: __m512,
) -> (__m512, __m512) {
    let table = _mm512_loadu_ps(const { &nibble_values(BIAS) }.as_ptr());
    let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.cast()));
    let hi = _mm512_srli_epi32::<4>(b);
    let hi = if BIAS != 0 {
        _mm512_permutexvar_ps(hi, table)
    } else {
        _mm512_cvtepi32_ps(hi)
    };
    (
        scaled::<OFF>(_mm512_permutexvar_ps(b, table), scale, offset),
        scaled::<OFF>(hi, scale, offset),
    )
}

/// `n - bias` as f32 for each nibble `n`.
const fn nibble_values(bias: i32) -> [f32; 16] {
    let mut v = [0f32; 16];
    let mut n = 0;
    while n < 16 {
        v[n] = (n as i32 - bias) as f32;
        n += 1;
    }
    v
}

/// One reduction step of 16 columns from 16 signed bytes at `q`, widened.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn byte<const OFF: bool>(q: *const u8, scale: __m512, offset: __m512) -> __m512 {
    let qi = _mm512_cvtepi8_epi32(_mm_loadu_si128(q.cast()));
    widen::<OFF>(qi, scale, offset)
}

/// Integers `qi` times the scales, plus the offsets if the type has them.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn widen<const OFF: bool>(qi: __m512i, scale: __m512, offset: __m512) -> __m512 {
    scaled::<OFF>(_mm512_cvtepi32_ps(qi), scale, offset)
}

/// `qf` (integers as f32) times the scales, plus the offsets if the type has them. `q * d` is
/// exact, so `fma(q, d, m)` is the once-rounded `q * d + m` (module doc of `qexact`).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scaled<const OFF: bool>(qf: __m512, scale: __m512, offset: __m512) -> __m512 {
    if OFF {
        _mm512_fmadd_ps(qf, scale, offset)
    } else {
        _mm512_mul_ps(qf, scale)
    }
}
