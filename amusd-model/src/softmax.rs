//! Attention's softmax in a fixed order of operations: `exp(s - max)` for every score, and the
//! reciprocal of their sum.
//!
//! libm's `expf` cost a function call per score (a tenth of a 9-row verify forward at a
//! 1000-token context) and its sum ran one dependent add per score. Here `exp` is a Cody-Waite
//! reduction and a degree-6 polynomial in FMAs (Cephes' `expf` coefficients, within 2 ulp of the
//! true value), and the sum runs in 8 lanes (score `i` into lane `i % 8`, in order) reduced by a
//! fixed tree. The portable path and the AVX2 path execute the same IEEE operations in the same
//! order, so they give the same bits (tested), and the verify model's batch invariance does not
//! depend on which one runs. The AVX-512 path does the same on sixteen lanes.

/// Below this, `exp` is taken as 0 (`e^-87` is 1.6e-38, and the sum holds at least `e^0 = 1`).
const FLOOR: f32 = -87.0;
/// Above this the result would overflow; scores minus their maximum never get there.
const CEIL: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split in two: `n * LN2_HI` is exact for the `n` that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `(e^r - 1 - r) / r^2` for `|r| <= ln(2) / 2`, highest degree first.
const POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
const LANES: usize = 8;

/// Replaces each score `s` by `exp(s - max)` and returns `1 / sum` of the results; `max` is the
/// largest score (so the sum is at least 1).
pub fn softmax_in_place(scores: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512::usable() {
        // SAFETY: `usable` checked at run time that the CPU has AVX512F.
        return unsafe { avx512::softmax_in_place(scores) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::usable() {
        // SAFETY: `usable` checked at run time that the CPU has AVX2 and FMA.
        return unsafe { avx2::softmax_in_place(scores) };
    }
    portable::softmax_in_place(scores)
}

/// The reciprocal of the lanes' sum, by a fixed tree: `(l + (l + 4))`, then `+ 2`, then `+ 1`.
fn reciprocal_of_sum(lanes: [f32; LANES]) -> f32 {
    let four: [f32; 4] = std::array::from_fn(|l| lanes[l] + lanes[l + 4]);
    let two = [four[0] + four[2], four[1] + four[3]];
    1.0 / (two[0] + two[1])
}

/// The definition: one score at a time.
mod portable {
    use super::*;

    pub fn exp(x: f32) -> f32 {
        let x = x.min(CEIL);
        let n = (x * LOG2E).round_ties_even();
        let r = n.mul_add(-LN2_HI, x);
        let r = n.mul_add(-LN2_LO, r);
        let p = POLY[1..].iter().fold(POLY[0], |p, &c| p.mul_add(r, c));
        let y = p.mul_add(r * r, r) + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
        if x < FLOOR {
            0.0
        } else {
            y * scale
        }
    }

    pub fn softmax_in_place(scores: &mut [f32]) -> f32 {
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut lanes = [0f32; LANES];
        for (i, s) in scores.iter_mut().enumerate() {
            *s = exp(*s - max);
            lanes[i % LANES] += *s;
        }
        reciprocal_of_sum(lanes)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    pub fn usable() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// [`portable::exp`] on 8 lanes, operation for operation.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(x, _mm256_set1_ps(CEIL));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
        );
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
        let mut p = _mm256_set1_ps(POLY[0]);
        for &c in &POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(FLOOR));
        _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)))
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_in_place(scores: &mut [f32]) -> f32 {
        let body = scores.len() / LANES * LANES;
        let (head, tail) = scores.split_at_mut(body);
        let mut top = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in head.chunks_exact(LANES) {
            // SAFETY: `c` holds LANES floats.
            top = _mm256_max_ps(top, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        }
        let mut lanes = [0f32; LANES];
        // SAFETY: `lanes` holds LANES floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), top) };
        // Max is exact in any order; ±0 ties give the same differences below.
        let max = lanes
            .iter()
            .chain(tail.iter())
            .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = _mm256_setzero_ps();
        for c in head.chunks_exact_mut(LANES) {
            // SAFETY: `c` holds LANES floats.
            unsafe {
                let e = exp(_mm256_sub_ps(
                    _mm256_loadu_ps(c.as_ptr()),
                    _mm256_set1_ps(max),
                ));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                sum = _mm256_add_ps(sum, e);
            }
        }
        // SAFETY: `lanes` holds LANES floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        for (l, s) in tail.iter_mut().enumerate() {
            *s = portable::exp(*s - max);
            lanes[l] += *s;
        }
        reciprocal_of_sum(lanes)
    }
}

/// The AVX2 path's operations on sixteen lanes. The sums keep the definition's eight lanes and
/// order: a vector's low half holds scores `i..i + 8` and its high half `i + 8..i + 16`, so each
/// sum lane takes the low half's value, then the high half's.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    pub fn usable() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// [`portable::exp`] on 16 lanes, operation for operation.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(x, _mm512_set1_ps(CEIL));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
        let mut p = _mm512_set1_ps(POLY[0]);
        for &c in &POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        let kept = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(FLOOR));
        _mm512_maskz_mov_ps(kept, _mm512_mul_ps(y, _mm512_castsi512_ps(bits)))
    }

    /// # Safety
    /// The CPU must have AVX512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_in_place(scores: &mut [f32]) -> f32 {
        let (len, at) = (scores.len(), scores.as_mut_ptr());
        let (body, half) = (len / 16 * 16, len / LANES * LANES);
        let mut top = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..body).step_by(16) {
            top = _mm512_max_ps(top, _mm512_loadu_ps(at.add(i)));
        }
        // Max is exact in any order; ±0 ties give the same differences below.
        let max = scores[body..]
            .iter()
            .fold(_mm512_reduce_max_ps(top), |m, &v| m.max(v));
        let shift = _mm512_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        for i in (0..body).step_by(16) {
            let e = exp(_mm512_sub_ps(_mm512_loadu_ps(at.add(i)), shift));
            _mm512_storeu_ps(at.add(i), e);
            sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
            sum = _mm256_add_ps(sum, high);
        }
        if half > body {
            let x = _mm512_castps256_ps512(_mm256_loadu_ps(at.add(body)));
            let e = _mm512_castps512_ps256(exp(_mm512_sub_ps(x, shift)));
            _mm256_storeu_ps(at.add(body), e);
            sum = _mm256_add_ps(sum, e);
        }
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        for (l, s) in scores[half..].iter_mut().enumerate() {
            *s = portable::exp(*s - max);
            lanes[l] += *s;
        }
        reciprocal_of_sum(lanes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::test_values;
    use proptest::prelude::*;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_true_value() {
        let mut x = FLOOR;
        while x <= 10.0 {
            let (got, want) = (portable::exp(x), (x as f64).exp());
            let ulp = f32::from_bits(got.to_bits() + 1) - got;
            assert!(
                ((got as f64) - want).abs() <= 2.0 * ulp as f64,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(portable::exp(0.0), 1.0);
        assert_eq!(portable::exp(-100.0), 0.0);
        assert_eq!(portable::exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut s = test_values(37, 3);
        let inv = softmax_in_place(&mut s);
        let total: f32 = s.iter().map(|e| e * inv).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert!(s.iter().all(|&e| e > 0.0 && e <= 1.0));
    }

    proptest! {
        /// The dispatched path has the portable path's bits, whatever the length (whole lanes and
        /// a tail) and the scale of the scores (some far enough below the max to underflow).
        #[test]
        fn the_dispatched_path_has_the_portable_bits(
            n in 1usize..80, scale in prop::sample::select(vec![0.1f32, 10.0, 300.0]), seed: u64,
        ) {
            let scores: Vec<f32> = test_values(n, seed).iter().map(|v| v * scale).collect();
            let (mut a, mut b) = (scores.clone(), scores.clone());
            let (ia, ib) = (softmax_in_place(&mut a), portable::softmax_in_place(&mut b));
            prop_assert_eq!(ia.to_bits(), ib.to_bits());
            prop_assert_eq!(bits(&a), bits(&b));
            #[cfg(target_arch = "x86_64")]
            if avx2::usable() {
                let mut c = scores;
                // SAFETY: `usable` checked that the CPU has AVX2 and FMA.
                let ic = unsafe { avx2::softmax_in_place(&mut c) };
                prop_assert_eq!((ic.to_bits(), bits(&c)), (ib.to_bits(), bits(&b)));
            }
        }
    }
}
