//! Philox4x32-10 (Salmon et al., SC'11; Random123's `philox4x32_R(10, ctr, key)`), one counter at a
//! time ([`philox4x32_10`], the definition) and eight at a time ([`noise_bits8`]: AVX2 when the CPU
//! has it, chosen at run time, tested against the definition bit for bit). Sampling draws one
//! counter per vocabulary entry a position could choose, ~49k for SmolLM2, so the batch form is
//! what keeps a sampled position from costing a tenth of a forward pass.

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds (Random123's `philox4x32_R(10, ctr, key)`).
pub fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(PHILOX_W0);
            key[1] = key[1].wrapping_add(PHILOX_W1);
        }
        let p0 = u64::from(PHILOX_M0) * u64::from(ctr[0]);
        let p1 = u64::from(PHILOX_M1) * u64::from(ctr[2]);
        ctr = [
            (p1 >> 32) as u32 ^ ctr[1] ^ key[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ ctr[3] ^ key[1],
            p0 as u32,
        ];
    }
    ctr
}

/// The counter and key of `(seed, position, token)`: counter `[token, position low, position high,
/// 0]`, key the seed's two halves.
fn counter(seed: u64, position: u64, token: u32) -> ([u32; 4], [u32; 2]) {
    (
        [token, position as u32, (position >> 32) as u32, 0],
        [seed as u32, (seed >> 32) as u32],
    )
}

/// The 64 random bits of `(seed, position, token)`: the first two output words.
pub fn noise_bits(seed: u64, position: u64, token: u32) -> u64 {
    let (ctr, key) = counter(seed, position, token);
    let out = philox4x32_10(ctr, key);
    u64::from(out[0]) | (u64::from(out[1]) << 32)
}

/// [`noise_bits`] of eight tokens at one position.
pub fn noise_bits8(seed: u64, position: u64, tokens: &[u32; 8]) -> [u64; 8] {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { avx2::noise_bits8(seed, position, tokens) };
    }
    noise_bits8_portable(seed, position, tokens)
}

fn noise_bits8_portable(seed: u64, position: u64, tokens: &[u32; 8]) -> [u64; 8] {
    tokens.map(|t| noise_bits(seed, position, t))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// The high and low 32 bits of each lane's 32x32-bit product with `m`: `mul_epu32` multiplies
    /// the even lanes, so the odd ones are shifted down and multiplied apart.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mul_hi_lo(a: __m256i, m: __m256i) -> (__m256i, __m256i) {
        let even = _mm256_mul_epu32(a, m);
        let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), m);
        let hi = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
        let lo = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
        (hi, lo)
    }

    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn noise_bits8(seed: u64, position: u64, tokens: &[u32; 8]) -> [u64; 8] {
        let (ctr, mut key) = counter(seed, position, 0);
        let mut c0 = _mm256_loadu_si256(tokens.as_ptr().cast());
        let mut c1 = _mm256_set1_epi32(ctr[1] as i32);
        let mut c2 = _mm256_set1_epi32(ctr[2] as i32);
        let mut c3 = _mm256_set1_epi32(ctr[3] as i32);
        let (m0, m1) = (
            _mm256_set1_epi32(PHILOX_M0 as i32),
            _mm256_set1_epi32(PHILOX_M1 as i32),
        );
        for round in 0..10 {
            if round > 0 {
                key[0] = key[0].wrapping_add(PHILOX_W0);
                key[1] = key[1].wrapping_add(PHILOX_W1);
            }
            let (hi0, lo0) = mul_hi_lo(c0, m0);
            let (hi1, lo1) = mul_hi_lo(c2, m1);
            let k0 = _mm256_set1_epi32(key[0] as i32);
            let k1 = _mm256_set1_epi32(key[1] as i32);
            (c0, c1, c2, c3) = (
                _mm256_xor_si256(_mm256_xor_si256(hi1, c1), k0),
                lo1,
                _mm256_xor_si256(_mm256_xor_si256(hi0, c3), k1),
                lo0,
            );
        }
        let (mut w0, mut w1) = ([0u32; 8], [0u32; 8]);
        _mm256_storeu_si256(w0.as_mut_ptr().cast(), c0);
        _mm256_storeu_si256(w1.as_mut_ptr().cast(), c1);
        std::array::from_fn(|i| u64::from(w0[i]) | (u64::from(w1[i]) << 32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Random123's `kat_vectors`, the three `philox4x32 10` lines.
    #[test]
    fn philox_matches_the_published_known_answers() {
        let cases = [
            (
                [0; 4],
                [0; 2],
                [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
            ),
            (
                [u32::MAX; 4],
                [u32::MAX; 2],
                [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
            ),
            (
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0],
                [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
            ),
        ];
        for (ctr, key, want) in cases {
            assert_eq!(philox4x32_10(ctr, key), want);
        }
    }

    proptest! {
        #[test]
        fn eight_at_a_time_is_eight_times_one(seed: u64, position: u64, tokens: [u32; 8]) {
            let want = noise_bits8_portable(seed, position, &tokens);
            prop_assert_eq!(noise_bits8(seed, position, &tokens), want);
        }
    }
}
