//! The AVX2 kernels (with FMA and F16C): eight outputs per vector.

// Register tiles are indexed by row and vector; iterators would hide which register is which.
#![allow(clippy::needless_range_loop)]
use super::*;
use std::arch::x86_64::*;

fn check() {
    assert!(
        Isa::Avx2.supported(),
        "AVX2 kernel on a CPU without AVX2, FMA and F16C"
    );
}

pub fn rows(kind: BlockKind, xs: &[&[f32]], panel: &[u8], out: &mut [f32]) {
    check();
    let k = xs[0].len();
    assert!(xs.iter().all(|x| x.len() == k) && out.len() == xs.len() * PANEL);
    assert!(k.is_multiple_of(GROUP) && panel.len() == k / GROUP * kind.group_bytes());
    // SAFETY: the CPU has AVX2, FMA and F16C (checked); `rows_of` reads `k` values of each
    // row, `k / GROUP` groups of `panel` and writes `xs.len() * PANEL` outputs (asserted).
    unsafe { by_kind!(kind, rows_of(xs, panel, out)) }
}

/// 16 vector registers hold 8 accumulators besides the weights: one row of a byte type takes all
/// 64 columns in one pass (8 independent FMA chains hide the FMA latency, and decoding reads each
/// byte once), more rows take narrower strips. A nibble type's row takes two passes of 32
/// columns: a whole panel's scales (and offsets) beside 8 accumulators spill, and LLVM then also
/// spills the unpacked nibbles; 4 chains of two FMAs a nibble byte keep the ports as busy. One
/// row, in DRAM (`AMUSD_BENCH_COPIES=60 AMUSD_BENCH_MS=1 cargo bench -p amusd-model --bench
/// qexact`, three rounds): q4_1 gate/up 171 / 172 / 172 -> 132 / 132 / 139 us, q4_0 172 / 171 /
/// 186 -> 135 / 135 / 137, q4_k 155 -> 121-132, q2_k 184-201 -> 163-171; q8_0 in 32-column
/// passes was slower (137-159 -> 155-156), as were two nibble rows in 16-column ones (level to
/// 10% slower). Two nibble rows in 64-column strips spill an accumulator (`perf annotate`): in
/// 24-column ones (48 + 16) they do not, and three byte rows keep 9 chains instead of 6 that way
/// (`AMUSD_BENCH_MS=2,3 cargo bench --bench qexact -- q4_1 q8_0`, in cache, three alternating
/// rounds: q4_1 m = 2 gate/up 262 / 257 / 236 -> 231 / 230 / 218 us, q8_0 m = 3 286 / 277 / 288
/// -> 241 / 241 / 254; the verify model's two-row forward, `ROWS=2 fwd_probe`, fastest of 40
/// 15.9-16.5 -> 15.5 ms). Three nibble rows or two byte rows in 24-column strips were slower.
/// Five byte rows take 16-column strips (10 chains; q8_0 m = 5 gate/up 472 / 467 / 473 -> 375 /
/// 372 / 367 us); six were slower that way (530 -> 590).
#[target_feature(enable = "avx2,fma,f16c")]
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
        1 if NIB => strips::<1, 4, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        1 => strips::<1, 8, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        2 if NIB => strips::<2, 3, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        2 => strips::<2, 4, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        3 if NIB => strips::<3, 2, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        3 => strips::<3, 3, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        4 => strips::<4, 2, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        5 if !NIB => strips::<5, 2, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        5 => strips::<5, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        6 => strips::<6, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        7 => strips::<7, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        8 => strips::<8, 1, NIB, OFF, BIAS, F32, SPLIT>(xs, panel, out),
        r => unreachable!("a direct tile of {r} rows"),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
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
    let whole = PANEL / (8 * V) * 8 * V;
    for col in (0..whole).step_by(8 * V) {
        let acc = strip::<R, V, NIB, OFF, BIAS, F32, SPLIT>(&xs, k, panel, col);
        store(&acc, out, col);
    }
    // A strip width that does not divide the panel leaves 16 columns (three vectors: 48 + 16).
    if whole < PANEL {
        debug_assert_eq!(PANEL - whole, 16);
        let acc = strip::<R, 2, NIB, OFF, BIAS, F32, SPLIT>(&xs, k, panel, whole);
        store(&acc, out, whole);
    }
}

/// A strip's sums into `R` rows of `PANEL` outputs, from column `col`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store<const R: usize, const V: usize>(
    acc: &[[__m256; V]; R],
    out: &mut [f32],
    col: usize,
) {
    for r in 0..R {
        for v in 0..V {
            _mm256_storeu_ps(out.as_mut_ptr().add(r * PANEL + col + 8 * v), acc[r][v]);
        }
    }
}

/// Columns `col .. col + 8 V` of `R` rows, every group, widening in registers. Each lane is
/// one output's accumulator and takes one FMA per reduction step, in order.
#[target_feature(enable = "avx2,fma,f16c")]
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
) -> [[__m256; V]; R] {
    let gb = group_bytes::<NIB, OFF, F32, SPLIT>();
    let ahead = strip_prefetch(col, gb, panel.len());
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    for g in 0..k / GROUP {
        let base = panel.as_ptr().add(g * gb);
        prefetch_range(base.wrapping_add(ahead), gb);
        let sc: [(__m256, __m256); V] =
            std::array::from_fn(|v| half_scales::<OFF, F32, false>(base, col + 8 * v));
        let q = base.add(scale_bytes::<OFF, F32, SPLIT>() + col);
        let p0 = g * GROUP;
        if NIB {
            let mut sc = sc;
            for s in 0..GROUP / 2 {
                if SPLIT && s == GROUP / 4 {
                    sc = std::array::from_fn(|v| half_scales::<OFF, F32, true>(base, col + 8 * v));
                }
                for v in 0..V {
                    let (wl, wh) =
                        nibble_pair::<OFF, BIAS>(q.add(s * PANEL + 8 * v), sc[v].0, sc[v].1);
                    for r in 0..R {
                        let x = xs[r].add(p0 + 2 * s);
                        acc[r][v] = _mm256_fmadd_ps(_mm256_set1_ps(*x), wl, acc[r][v]);
                        acc[r][v] = _mm256_fmadd_ps(_mm256_set1_ps(*x.add(1)), wh, acc[r][v]);
                    }
                }
            }
        } else {
            let mut sc = sc;
            for t in 0..GROUP {
                if SPLIT && t == GROUP / 2 {
                    sc = std::array::from_fn(|v| half_scales::<OFF, F32, true>(base, col + 8 * v));
                }
                for v in 0..V {
                    let w = byte::<OFF>(q.add(t * PANEL + 8 * v), sc[v].0, sc[v].1);
                    for r in 0..R {
                        let x = _mm256_set1_ps(*xs[r].add(p0 + t));
                        acc[r][v] = _mm256_fmadd_ps(x, w, acc[r][v]);
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
    // SAFETY: the CPU has AVX2, FMA and F16C (checked); `widen_group_of` reads one group
    // (`kind.group_bytes()`, asserted) and writes `GROUP * PANEL` floats (asserted).
    unsafe { by_kind!(kind, widen_group_of(group, wide)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
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
    for v in 0..8 {
        let (mut scale, mut offset) = half_scales::<OFF, F32, false>(base, 8 * v);
        let q = base.add(scale_bytes::<OFF, F32, SPLIT>() + 8 * v);
        let o = out.add(8 * v);
        if NIB {
            for s in 0..GROUP / 2 {
                if SPLIT && s == GROUP / 4 {
                    (scale, offset) = half_scales::<OFF, F32, true>(base, 8 * v);
                }
                let (wl, wh) = nibble_pair::<OFF, BIAS>(q.add(s * PANEL), scale, offset);
                _mm256_storeu_ps(o.add(2 * s * PANEL), wl);
                _mm256_storeu_ps(o.add((2 * s + 1) * PANEL), wh);
            }
        } else {
            for t in 0..GROUP {
                if SPLIT && t == GROUP / 2 {
                    (scale, offset) = half_scales::<OFF, F32, true>(base, 8 * v);
                }
                _mm256_storeu_ps(
                    o.add(t * PANEL),
                    byte::<OFF>(q.add(t * PANEL), scale, offset),
                );
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
        // SAFETY: the CPU has AVX2, FMA and F16C (checked); `tile` reads GROUP values of each
        // of its `r` rows of `x` (the last at (r - 1) k, inside `xs` by the assert above), all
        // of `wide`, and the sums of `r` rows (the caller's).
        match r {
            1 => tile::<1, 8>(xs, k, wide, a),
            2 => tile::<2, 4>(xs, k, wide, a),
            3 => tile::<3, 4>(xs, k, wide, a),
            4 => tile::<4, 2>(xs, k, wide, a),
            5 => tile::<5, 2>(xs, k, wide, a),
            _ => tile::<6, 2>(xs, k, wide, a),
        }
        i += r;
    }
}

/// `R` rows over the widened group, in strips of `8 V` columns: 16 vector registers hold at
/// most 12 accumulators besides the weights and a broadcast.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const R: usize, const V: usize>(x: &[f32], k: usize, wide: &[f32], sums: SumRows) {
    let w = wide.as_ptr();
    for col in (0..PANEL).step_by(8 * V) {
        let mut s: [[__m256; V]; R] = std::array::from_fn(|r| {
            std::array::from_fn(|v| match sums.fresh {
                true => _mm256_setzero_ps(),
                false => _mm256_loadu_ps(sums.src.add(r * PANEL + col + 8 * v)),
            })
        });
        for t in 0..GROUP {
            let wt: [__m256; V] =
                std::array::from_fn(|v| _mm256_loadu_ps(w.add(t * PANEL + col + 8 * v)));
            for r in 0..R {
                let xv = _mm256_set1_ps(*x.as_ptr().add(r * k + t));
                for v in 0..V {
                    s[r][v] = _mm256_fmadd_ps(xv, wt[v], s[r][v]);
                }
            }
        }
        for r in 0..R {
            for v in 0..V {
                _mm256_storeu_ps(sums.dst.add(r * sums.stride + col + 8 * v), s[r][v]);
            }
        }
    }
}

/// The scales (and offsets) of columns `col .. col + 8` of the group at `base`: its first half's,
/// or with `SECOND` a split group's second half's (the sets after the first half's,
/// [`BlockKind::scale_sets`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn half_scales<const OFF: bool, const F32: bool, const SECOND: bool>(
    base: *const u8,
    col: usize,
) -> (__m256, __m256) {
    let first = if SECOND { 1 + OFF as usize } else { 0 };
    let scale = scale_set::<F32>(base, first, col);
    let offset = if OFF {
        scale_set::<F32>(base, first + 1, col)
    } else {
        _mm256_setzero_ps()
    };
    (scale, offset)
}

/// Columns `col .. col + 8` of the group's scale set `set` (f32, or f16 widened).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scale_set<const F32: bool>(base: *const u8, set: usize, col: usize) -> __m256 {
    if F32 {
        _mm256_loadu_ps(base.cast::<f32>().add(set * PANEL + col))
    } else {
        _mm256_cvtph_ps(_mm_loadu_si128(
            base.cast::<u16>().add(set * PANEL + col).cast(),
        ))
    }
}

/// Two reduction steps of 8 columns from 8 bytes of nibble pairs at `q`, widened.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibble_pair<const OFF: bool, const BIAS: i32>(
    q: *const u8,
    scale: __m256,
    offset: __m256,
) -> (__m256, __m256) {
    let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.cast()));
    let mut lo = _mm256_and_si256(b, _mm256_set1_epi32(0x0F));
    let mut hi = _mm256_srli_epi32::<4>(b);
    if BIAS != 0 {
        lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(BIAS));
        hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(BIAS));
    }
    (
        widen::<OFF>(lo, scale, offset),
        widen::<OFF>(hi, scale, offset),
    )
}

/// One reduction step of 8 columns from 8 signed bytes at `q`, widened.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn byte<const OFF: bool>(q: *const u8, scale: __m256, offset: __m256) -> __m256 {
    widen::<OFF>(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.cast())),
        scale,
        offset,
    )
}

/// Integers `qi` times the scales, plus the offsets if the type has them. `q * d` is exact,
/// so `fma(q, d, m)` is the once-rounded `q * d + m` (module doc).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn widen<const OFF: bool>(qi: __m256i, scale: __m256, offset: __m256) -> __m256 {
    let qf = _mm256_cvtepi32_ps(qi);
    if OFF {
        _mm256_fmadd_ps(qf, scale, offset)
    } else {
        _mm256_mul_ps(qf, scale)
    }
}
