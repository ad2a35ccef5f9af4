//! The MLP's gate, `silu(g) * u = g / (1 + exp(-g)) * u`, with `exp` vectorized.
//!
//! The forward used to call libm's `expf` once per gate value: 46 080 calls a row, about a tenth
//! of a 200-token prefill. [`expf`] is glibc's `expf` (since 2.28, from Arm's optimized-routines)
//! written out: the same double-precision operations, fused where glibc's FMA build fuses them,
//! and the same 32-entry table. On a glibc machine with FMA (where `expf` resolves to that build)
//! it returns libm's bits for every input (all 2^32 compared once, glibc 2.36; the test compares
//! every 509th), so every output recorded before this module stays valid; being ours, it returns
//! those bits on every platform. The AVX-512 path runs the same operations eight doubles at a time
//! (two vectors per sixteen gate values) and hands the rare lanes that need glibc's special cases
//! (`|x| >= 88`, infinities, NaN) to the scalar code, so both paths give the same bits (tested).

/// `N / ln 2` for the table's `N = 32` steps per octave.
const INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
/// `1.5 * 2^52`: adding it rounds a double below 2^51 to an integer, in its low mantissa bits.
const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
/// `2^(r / N)` on `|r| <= 1/2`, as `(C0 r + C1) r^2 + (C2 r + 1)`.
const C0: f64 = f64::from_bits(0x3ebc_6af8_4b91_2394);
const C1: f64 = f64::from_bits(0x3f2e_bfce_50fa_c4f3);
const C2: f64 = f64::from_bits(0x3f96_2e42_ff0c_52d6);
/// Bits of `2^(i / 32)` less `i << 47`: adding `k << 47` for `k = i mod 32` puts `k / 32`'s
/// integer part into the exponent.
const TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];
/// The top 12 bits of `|x|` above which glibc leaves the main path (`|x| >= 88`).
const TOP_LIMIT: u32 = 0x42a;

/// The top 12 bits of `|x|`'s encoding (sign dropped): exponent and the mantissa's first 3 bits.
fn abs_top(x: f32) -> u32 {
    (x.to_bits() >> 20) & 0x7ff
}

/// `e^x` in f32, with glibc's bits (module doc).
pub fn expf(x: f32) -> f32 {
    if abs_top(x) > TOP_LIMIT {
        if let Some(y) = special(x) {
            return y;
        }
    }
    let xd = f64::from(x);
    let kd = xd.mul_add(INV_LN2_N, SHIFT);
    let ki = kd.to_bits();
    let kd = kd - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd);
    let s = f64::from_bits(TABLE[(ki % 32) as usize].wrapping_add(ki << 47));
    let z = r.mul_add(C0, C1);
    let y = r.mul_add(C2, 1.0);
    (z.mul_add(r * r, y) * s) as f32
}

/// glibc's answers off the main path (`|x| >= 88`): NaN and the infinities, overflow past
/// `ln(2^128)`, underflow below `ln(2^-150)`, and the smallest subnormal just above it; `None`
/// where the main path's value stands.
fn special(x: f32) -> Option<f32> {
    const OVERFLOW: f32 = f32::from_bits(0x42b1_7217); // 88.72283
    const UNDERFLOW: f32 = f32::from_bits(0xc2cf_f1b4); // -103.97208
    const MAY_UNDERFLOW: f32 = f32::from_bits(0xc2ce_8ecf); // -103.27893
    if x == f32::NEG_INFINITY {
        Some(0.0)
    } else if abs_top(x) >= abs_top(f32::INFINITY) {
        Some(x + x)
    } else if x > OVERFLOW {
        Some(f32::INFINITY)
    } else if x < UNDERFLOW {
        Some(0.0)
    } else if x < MAY_UNDERFLOW {
        // glibc squares 0x1.4p-75 in f32: 0.78 of the smallest subnormal, rounded up to it.
        Some(f32::from_bits(1))
    } else {
        None
    }
}

/// `gate = silu(gate) * up`, elementwise: `g / (1 + exp(-g)) * u` in f32.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "silu_mul: gate and up differ in length"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512::usable() {
        // SAFETY: `usable` checked that the CPU has AVX512F; the slices have the same length.
        return unsafe { avx512::silu_mul(gate, up) };
    }
    portable::silu_mul(gate, up);
}

/// The definition, one value at a time.
mod portable {
    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.iter_mut().zip(up) {
            *g = silu_times(*g, *u);
        }
    }

    pub fn silu_times(g: f32, u: f32) -> f32 {
        g / (1.0 + super::expf(-g)) * u
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    pub fn usable() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// # Safety
    /// The CPU has AVX512F; `gate` and `up` have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let whole = gate.len() / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        for i in (0..whole).step_by(16) {
            let x = _mm512_loadu_ps(g.add(i));
            let neg = _mm512_sub_ps(_mm512_setzero_ps(), x);
            let e = exp16(neg);
            let y = _mm512_mul_ps(
                _mm512_div_ps(x, _mm512_add_ps(one, e)),
                _mm512_loadu_ps(u.add(i)),
            );
            _mm512_storeu_ps(g.add(i), y);
        }
        super::portable::silu_mul(&mut gate[whole..], &up[whole..]);
    }

    /// [`expf`] of sixteen values: the main path in two halves of eight doubles, then the lanes
    /// off it one by one.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let lo = exp8(_mm512_cvtps_pd(_mm512_castps512_ps256(x)));
        let hi = exp8(_mm512_cvtps_pd(_mm256_castpd_ps(
            _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)),
        )));
        let halves = |v: __m512d| _mm256_castps_pd(_mm512_cvtpd_ps(v));
        let y = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castpd256_pd512(halves(lo)),
            halves(hi),
        ));
        let top = _mm512_and_si512(
            _mm512_srli_epi32::<20>(_mm512_castps_si512(x)),
            _mm512_set1_epi32(0x7ff),
        );
        let off = _mm512_cmpgt_epu32_mask(top, _mm512_set1_epi32(TOP_LIMIT as i32));
        if off == 0 {
            return y;
        }
        let (mut xs, mut ys) = ([0f32; 16], [0f32; 16]);
        _mm512_storeu_ps(xs.as_mut_ptr(), x);
        _mm512_storeu_ps(ys.as_mut_ptr(), y);
        for l in (0..16).filter(|&l| off >> l & 1 == 1) {
            ys[l] = expf(xs[l]);
        }
        _mm512_loadu_ps(ys.as_ptr())
    }

    /// [`expf`]'s main path on eight doubles (converted from f32, so exactly the scalar's `xd`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp8(xd: __m512d) -> __m512d {
        let inv = _mm512_set1_pd(INV_LN2_N);
        let shift = _mm512_set1_pd(SHIFT);
        let kd = _mm512_fmadd_pd(xd, inv, shift);
        let ki = _mm512_castpd_si512(kd);
        let kd = _mm512_sub_pd(kd, shift);
        let r = _mm512_fmsub_pd(inv, xd, kd);
        let s = _mm512_castsi512_pd(_mm512_add_epi64(table(ki), _mm512_slli_epi64::<47>(ki)));
        let z = _mm512_fmadd_pd(r, _mm512_set1_pd(C0), _mm512_set1_pd(C1));
        let y = _mm512_fmadd_pd(r, _mm512_set1_pd(C2), _mm512_set1_pd(1.0));
        _mm512_mul_pd(_mm512_fmadd_pd(z, _mm512_mul_pd(r, r), y), s)
    }

    /// `TABLE[ki mod 32]` per lane: two 16-entry lookups, chosen by bit 4 of the index.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn table(ki: __m512i) -> __m512i {
        let t = |at: usize| _mm512_loadu_si512(TABLE[at..].as_ptr().cast());
        let low = _mm512_permutex2var_epi64(t(0), ki, t(8));
        let high = _mm512_permutex2var_epi64(t(16), ki, t(24));
        let upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
        _mm512_mask_blend_epi64(upper, low, high)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every 509th f32 encoding (8.4 million of them, both signs, every exponent), the special
    /// cases' thresholds and their neighbours.
    fn inputs() -> impl Iterator<Item = f32> {
        let edges = [
            0x42b1_7217u32,
            0xc2cf_f1b4,
            0xc2ce_8ecf,
            0x42b0_0000,
            0xc2b0_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0,
            0x8000_0000,
        ];
        let near = edges
            .into_iter()
            .flat_map(|e| (0..64u32).flat_map(move |d| [e.wrapping_add(d), e.wrapping_sub(d)]));
        (0..u32::MAX).step_by(509).chain(near).map(f32::from_bits)
    }

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// The bits of glibc's `expf` where it is the FMA build (x86-64 with AVX2 and FMA): what
    /// the forward computed before, so recorded outputs stay valid.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    fn expf_has_glibc_bits() {
        assert!(
            is_x86_feature_detected!("fma") && is_x86_feature_detected!("avx2"),
            "glibc's expf is its FMA build only on CPUs with FMA and AVX2"
        );
        let wrong: Vec<f32> = inputs().filter(|&x| !same(expf(x), x.exp())).collect();
        assert!(
            wrong.is_empty(),
            "{} inputs differ, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(8)]
        );
    }

    /// The dispatched path (AVX-512 where the CPU has it) against the definition.
    #[test]
    fn the_dispatched_path_has_the_definitions_bits() {
        let xs: Vec<f32> = inputs().collect();
        let ups: Vec<f32> = (0..xs.len()).map(|i| 1.0 + (i % 7) as f32 / 8.0).collect();
        // The gate is `-x`, so `exp` sees every input.
        let mut gate: Vec<f32> = xs.iter().map(|x| -x).collect();
        silu_mul(&mut gate, &ups);
        for ((g, x), u) in gate.iter().zip(&xs).zip(&ups) {
            let want = portable::silu_times(-x, *u);
            assert!(same(*g, want), "silu(-{x}) * {u}: {g} against {want}");
        }
    }

    proptest! {
        #[test]
        fn any_length_matches_the_definition(
            values in proptest::collection::vec(-120f32..120.0, 0..70),
        ) {
            let ups: Vec<f32> = values.iter().map(|v| v * 0.5 - 1.0).collect();
            let mut got = values.clone();
            silu_mul(&mut got, &ups);
            for ((g, v), u) in got.iter().zip(&values).zip(&ups) {
                prop_assert!(same(*g, portable::silu_times(*v, *u)));
            }
        }
    }
}
