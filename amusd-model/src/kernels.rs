//! Batch-invariant CPU kernels.
//!
//! Speculative decoding is only exact if the verify model's logits at a position do not depend on
//! how many other positions were computed in the same forward pass. BLAS-style GEMMs break that:
//! they pick blockings and micro-kernels (and a GEMV path for one row) by problem shape, so the
//! reduction order of a dot product, and hence its rounding, changes with the batch size.
//!
//! Every output element here is produced by one function, [`dot`], whose reduction order depends only
//! on the length of the reduced dimension. Tiling is over *independent* outputs (several weight rows
//! at once share the loads of one activation row), never over the reduction, so an element's bits are
//! the same whether it was computed alone, in a 4-row tile, or in a 32-token batch.

/// Lanes of independent partial sums in [`dot`]. Fixed: changing it changes every result's rounding.
const LANES: usize = 16;

/// Reduces `acc` in a fixed pairwise order.
#[inline(always)]
fn reduce(acc: [f32; LANES]) -> f32 {
    let mut a = acc;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            a[l] += a[l + width];
        }
        width /= 2;
    }
    a[0]
}

/// One step of every lane: `acc[l] += a[l] * b[l]`, fused. Fixed-size arrays so the compiler sees
/// no bounds checks and emits one vector FMA per register.
#[inline(always)]
fn fma_lanes(acc: &mut [f32; LANES], a: &[f32; LANES], b: &[f32; LANES]) {
    for l in 0..LANES {
        acc[l] = a[l].mul_add(b[l], acc[l]);
    }
}

#[inline(always)]
fn lanes(s: &[f32], c: usize) -> &[f32; LANES] {
    s[c..c + LANES].try_into().expect("LANES-wide chunk")
}

/// Dot product with a reduction order that depends only on `a.len()`.
///
/// Lane `l` accumulates elements `l, l + LANES, ...` with fused multiply-adds (vectorised by the
/// compiler), the lanes are then reduced pairwise, and the tail is added last in index order.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let body = n - n % LANES;
    let mut acc = [0f32; LANES];
    let mut c = 0;
    while c < body {
        fma_lanes(&mut acc, lanes(a, c), lanes(b, c));
        c += LANES;
    }
    let mut s = reduce(acc);
    for i in body..n {
        s = a[i].mul_add(b[i], s);
    }
    s
}

/// Explicit SIMD for the hot loop. LLVM's auto-vectoriser picks 128-bit vectors for the portable code,
/// which leaves most of the machine idle. Each path keeps lane `l` of a 16-lane accumulator summing
/// elements `l, l + 16, ...` with FMAs in order, and reduces through [`reduce`], so all paths are
/// bit-identical to [`dot`] (an FMA rounds once, however it is issued).
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod simd {
    use super::{reduce, LANES};
    use std::arch::x86_64::*;

    /// `out[r][j] = dot(xs[r], ws[j])` for up to 3 activation rows and exactly 4 weight rows.
    #[inline(always)]
    pub fn tile<const R: usize>(xs: [&[f32]; R], ws: [&[f32]; 4], body: usize) -> [[f32; 4]; R] {
        // SAFETY: every load reads 16 floats at offset c < body <= len of each slice (checked by the
        // caller's asserts: all rows have length >= body, body a multiple of 16); avx512f is enabled
        // at compile time (cfg above).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            let mut c = 0;
            while c < body {
                let w = [
                    _mm512_loadu_ps(ws[0].as_ptr().add(c)),
                    _mm512_loadu_ps(ws[1].as_ptr().add(c)),
                    _mm512_loadu_ps(ws[2].as_ptr().add(c)),
                    _mm512_loadu_ps(ws[3].as_ptr().add(c)),
                ];
                for r in 0..R {
                    let x = _mm512_loadu_ps(xs[r].as_ptr().add(c));
                    for j in 0..4 {
                        acc[r][j] = _mm512_fmadd_ps(x, w[j], acc[r][j]);
                    }
                }
                c += LANES;
            }
            let mut out = [[0f32; 4]; R];
            for r in 0..R {
                for j in 0..4 {
                    let mut lanes = [0f32; LANES];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r][j]);
                    out[r][j] = reduce(lanes);
                }
            }
            out
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    not(target_feature = "avx512f")
))]
mod simd {
    use super::{reduce, LANES};
    use std::arch::x86_64::*;

    /// As the AVX-512 version, with each 16-lane accumulator split over two 8-lane registers.
    #[inline(always)]
    pub fn tile<const R: usize>(xs: [&[f32]; R], ws: [&[f32]; 4], body: usize) -> [[f32; 4]; R] {
        // SAFETY: as in the AVX-512 version; avx2 and fma are enabled at compile time.
        unsafe {
            let mut acc = [[[_mm256_setzero_ps(); 2]; 4]; R];
            let mut c = 0;
            while c < body {
                for r in 0..R {
                    let x0 = _mm256_loadu_ps(xs[r].as_ptr().add(c));
                    let x1 = _mm256_loadu_ps(xs[r].as_ptr().add(c + 8));
                    for j in 0..4 {
                        let w0 = _mm256_loadu_ps(ws[j].as_ptr().add(c));
                        let w1 = _mm256_loadu_ps(ws[j].as_ptr().add(c + 8));
                        acc[r][j][0] = _mm256_fmadd_ps(x0, w0, acc[r][j][0]);
                        acc[r][j][1] = _mm256_fmadd_ps(x1, w1, acc[r][j][1]);
                    }
                }
                c += LANES;
            }
            let mut out = [[0f32; 4]; R];
            for r in 0..R {
                for j in 0..4 {
                    let mut lanes = [0f32; LANES];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][j][0]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[r][j][1]);
                    out[r][j] = reduce(lanes);
                }
            }
            out
        }
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    any(
        target_feature = "avx512f",
        all(target_feature = "avx2", target_feature = "fma")
    )
)))]
mod simd {
    use super::{fma_lanes, lanes, reduce, LANES};

    /// Portable version: the same lanes and order, vectorised as well as the compiler manages.
    #[inline(always)]
    pub fn tile<const R: usize>(xs: [&[f32]; R], ws: [&[f32]; 4], body: usize) -> [[f32; 4]; R] {
        let mut acc = [[[0f32; LANES]; 4]; R];
        let mut c = 0;
        while c < body {
            for r in 0..R {
                for j in 0..4 {
                    fma_lanes(&mut acc[r][j], lanes(xs[r], c), lanes(ws[j], c));
                }
            }
            c += LANES;
        }
        acc.map(|row| row.map(reduce))
    }
}

/// Dot products of `R` activation rows with 4 weight rows, each bit-identical to [`dot`].
#[inline(always)]
fn tile<const R: usize>(xs: [&[f32]; R], ws: [&[f32]; 4]) -> [[f32; 4]; R] {
    let n = xs[0].len();
    assert!(xs.iter().all(|x| x.len() == n) && ws.iter().all(|w| w.len() == n));
    let body = n - n % LANES;
    let mut out = simd::tile(xs, ws, body);
    for r in 0..R {
        for j in 0..4 {
            for i in body..n {
                out[r][j] = xs[r][i].mul_add(ws[j][i], out[r][j]);
            }
        }
    }
    out
}

/// `y[i, j] = dot(x[i, :], w[j, :])` for `x: [m, k]`, `w: [n, k]`, `y: [m, n]`, all row-major.
///
/// Weight rows are the outer loop so each block of four rows is read from memory once and reused from
/// L1 for every activation row: a k-token verification costs little more than one token while it is
/// bandwidth-bound, which is what makes speculative verification pay on a CPU.
pub fn matmul_t(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, y: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= n * k && y.len() >= m * n);
    matmul_t_rows(x, m, k, y, n, 0, n, |j| &w[j * k..(j + 1) * k]);
}

/// As [`matmul_t`] for weights stored in another form: `widen_row(j, dst)` writes weight row `j` as
/// f32 into `dst` (`k` values). Each block of four rows is widened once and then multiplied as f32 by
/// every activation row, so the results are bit-identical to [`matmul_t`] on the widened matrix
/// (f16 and bf16 widen exactly; a block-quantized row widens to its dequantized values).
pub fn matmul_t_widen(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    y: &mut [f32],
    widen_row: impl Fn(usize, &mut [f32]),
) {
    assert!(x.len() >= m * k && y.len() >= m * n);
    let mut buf = vec![0f32; 4 * k];
    let mut j0 = 0;
    while j0 < n {
        let rows = (n - j0).min(4);
        for r in 0..rows {
            widen_row(j0 + r, &mut buf[r * k..(r + 1) * k]);
        }
        matmul_t_rows(x, m, k, y, n, j0, j0 + rows, |j| {
            let r = j - j0;
            &buf[r * k..(r + 1) * k]
        });
        j0 += rows;
    }
}

/// Computes output columns `j_begin..j_end` of `y: [m, n]`, fetching weight row `j` with `row(j)`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn matmul_t_rows<'w>(
    x: &[f32],
    m: usize,
    k: usize,
    y: &mut [f32],
    n: usize,
    j_begin: usize,
    j_end: usize,
    row: impl Fn(usize) -> &'w [f32],
) {
    let xr = |i: usize| &x[i * k..(i + 1) * k];
    let mut j = j_begin;
    while j + 4 <= j_end {
        let w = [row(j), row(j + 1), row(j + 2), row(j + 3)];
        let mut i = 0;
        // Three activation rows at a time reuse each loaded weight vector three times.
        while i + 3 <= m {
            let out = tile::<3>([xr(i), xr(i + 1), xr(i + 2)], w);
            for (r, o) in out.iter().enumerate() {
                y[(i + r) * n + j..(i + r) * n + j + 4].copy_from_slice(o);
            }
            i += 3;
        }
        while i < m {
            let [o] = tile::<1>([xr(i)], w);
            y[i * n + j..i * n + j + 4].copy_from_slice(&o);
            i += 1;
        }
        j += 4;
    }
    while j < j_end {
        let wj = row(j);
        for i in 0..m {
            y[i * n + j] = dot(&x[i * k..(i + 1) * k], wj);
        }
        j += 1;
    }
}

/// RMSNorm of each `dim`-wide row of `x` in place: `x * weight / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for row in x.chunks_exact_mut(dim) {
        let ss = dot(row, row);
        let scale = 1.0 / (ss / dim as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * scale * *w;
        }
    }
}

/// `gate = silu(gate) * up`, elementwise.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * *u;
    }
}

/// Index of the largest value; ties go to the lowest index and NaN never wins, so the choice is a
/// pure function of the logits' bits.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// Causal attention of one query row over the cached keys and values of positions `0..=pos`.
///
/// `q` holds `n_heads` heads of `head_dim`; `keys`/`values` are laid out `[position][kv_head][head_dim]`.
/// Each head's scores, softmax and weighted sum run over positions in order, so the result for a
/// position does not depend on which other queries share the forward pass.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    pos: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let group = n_heads / n_kv_heads;
    let kv_stride = n_kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    scores.resize(pos + 1, 0.0);
    for h in 0..n_heads {
        let g = h / group;
        let qh = &q[h * head_dim..(h + 1) * head_dim];
        let mut max = f32::NEG_INFINITY;
        for (t, s) in scores.iter_mut().enumerate() {
            let off = t * kv_stride + g * head_dim;
            *s = dot(qh, &keys[off..off + head_dim]) * scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        let oh = &mut out[h * head_dim..(h + 1) * head_dim];
        oh.fill(0.0);
        for (t, &s) in scores.iter().enumerate() {
            let off = t * kv_stride + g * head_dim;
            let p = s * inv;
            for (o, v) in oh.iter_mut().zip(&values[off..off + head_dim]) {
                *o = p.mul_add(*v, *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = x[i * k..(i + 1) * k]
                    .iter()
                    .zip(&w[j * k..(j + 1) * k])
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn vals(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Each output row is bit-identical to computing that row alone, and close to f64 truth.
        #[test]
        fn matmul_rows_are_batch_invariant(m in 1usize..33, n in 1usize..23, k in 1usize..70, seed: u64) {
            let x = vals(m * k, seed);
            let w = vals(n * k, seed ^ 0xdead);
            let mut y = vec![0f32; m * n];
            matmul_t(&x, m, &w, n, k, &mut y);
            for i in 0..m {
                let mut yi = vec![0f32; n];
                matmul_t(&x[i * k..(i + 1) * k], 1, &w, n, k, &mut yi);
                prop_assert_eq!(
                    yi.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    y[i * n..(i + 1) * n].iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
            for (a, b) in y.iter().zip(naive(&x, m, &w, n, k)) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }

        #[test]
        fn widened_matmul_matches_f32(m in 1usize..9, n in 1usize..13, k in 1usize..40, seed: u64) {
            let x = vals(m * k, seed);
            let w16: Vec<half::f16> = vals(n * k, !seed).into_iter().map(half::f16::from_f32).collect();
            let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul_t(&x, m, &w32, n, k, &mut a);
            matmul_t_widen(&x, m, n, k, &mut b, |j, dst| {
                for (d, s) in dst.iter_mut().zip(&w16[j * k..(j + 1) * k]) { *d = s.to_f32(); }
            });
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn argmax_breaks_ties_low_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN, 0.7]), 3);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn attention_is_a_convex_combination_of_values() {
        let (nh, nkv, hd, pos) = (4, 2, 8, 5);
        let q = vals(nh * hd, 1);
        let keys = vals((pos + 1) * nkv * hd, 2);
        let values = vec![0.25f32; (pos + 1) * nkv * hd];
        let mut out = vec![0f32; nh * hd];
        attend(
            &q,
            &keys,
            &values,
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

    #[test]
    fn rms_norm_normalises_rows() {
        let mut x = vec![3.0f32, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        rms_norm(&mut x, &[1.0; 4], 0.0);
        let rms0 = (x[..4].iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms0 - 1.0).abs() < 1e-6);
        assert_eq!(&x[4..], &[1.0; 4]);
    }
}
