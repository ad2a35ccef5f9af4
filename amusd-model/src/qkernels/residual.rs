//! About 16-bit activations through the 8-bit integer kernels: each activation row goes in as two
//! rows of one batch, its 8-bit quantization and the residual that quantization leaves (itself
//! quantized to 8 bits), and the two products are summed.
//!
//! Why: the draft differs from the verify model by its arithmetic alone, and most of that
//! difference is its 8-bit activations (every block of every layer). Their error compounds over
//! the layers: teacher-forced over 4,096 positions of English and Python, the default draft's
//! argmax agreed with the f32 verify model's at 96.1% with 8-bit activations and at 99.9% with
//! the residual. The cost is small where the draft spends its time: a one-row product is bound by
//! reading the weights, and the kernels read each weight once for every row of a tile, so the
//! second row is mostly arithmetic the memory stalls hid.
//!
//! The residual `r = x - d q` is formed from the quantization [`matmul_int`] itself uses, so
//! `d q + d' q'` is within `d' / 2` of `x` per block (`d'` the residual block's scale, about
//! `d / 254`). The sum of the two products is a definition like `dot_portable`'s: every path
//! gives the same bits, and a row's result does not depend on the batch.

use super::{check_call, run, IntPacked, Path, QuantActs, QK};

/// How [`matmul_int_with`] gives activations to the integer kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IntActivations {
    /// Each 32-block quantized to 8 bits (scale `max|x| / 127`), as GGUF does.
    #[default]
    Bits8,
    /// The 8-bit quantization plus its 8-bit residual, two rows of one batch (module doc).
    Bits16,
}

impl IntActivations {
    /// `8` or `16`, as a model spec's `acts=` says them.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "8" => Some(Self::Bits8),
            "16" => Some(Self::Bits16),
            _ => None,
        }
    }
}

impl std::fmt::Display for IntActivations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bits8 => "8",
            Self::Bits16 => "16",
        })
    }
}

/// [`super::matmul_int`] with the activations `acts` says, on the fastest path this CPU has.
pub fn matmul_int_with(acts: IntActivations, x: &[f32], m: usize, w: &IntPacked, y: &mut [f32]) {
    matmul_int_with_on(Path::detect(), acts, x, m, w, y)
}

/// [`matmul_int_with`] on a given path.
///
/// # Panics
/// If the CPU lacks `path` or a buffer is too short.
pub fn matmul_int_with_on(
    path: Path,
    acts: IntActivations,
    x: &[f32],
    m: usize,
    w: &IntPacked,
    y: &mut [f32],
) {
    if acts == IntActivations::Bits8 {
        return super::matmul_int_on(path, x, m, w, y);
    }
    check_call(path, x, m, w, y);
    let (n, k) = (w.n, w.k);
    let first = QuantActs::new(x, m, k);
    let mut r = vec![0f32; m * k];
    first.residual(&x[..m * k], &mut r);
    let both = first.interleave(&QuantActs::new(&r, m, k));
    let mut pairs = vec![0f32; 2 * m * n];
    run(path, &both, 2 * m, w, &mut pairs);
    for (yi, pair) in y[..m * n]
        .chunks_exact_mut(n)
        .zip(pairs.chunks_exact(2 * n))
    {
        let (a, b) = pair.split_at(n);
        for ((o, &a), &b) in yi.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    }
}

/// For one activation row (whole blocks) as `acts` gives it to the kernels, in f64:
/// `|x - x̂|` (`x̂` the values the quantized parts stand for, `d q` and for `Bits16` also the
/// residual's `d' q'`) and the sum of the parts' norms, `|d q| + |d' q'|`: what bounds how far an
/// integer product can be from the f32 one ([`crate::greedy_head`]). Each part and difference is
/// exact or within 2^-52 of it; the sums and roots add a relative error of about `k` 2^-53.
pub(crate) fn quantization_norms(acts: IntActivations, x: &[f32]) -> (f64, f64) {
    let (mut q, mut q2, mut r) = ([0i8; QK], [0i8; QK], [0f32; QK]);
    let (mut err, mut first, mut second) = (0f64, 0f64, 0f64);
    for xs in x.chunks_exact(QK) {
        let (d, _, _) = QuantActs::quantize_block(xs, &mut q);
        let d2 = match acts {
            IntActivations::Bits8 => 0.0,
            IntActivations::Bits16 => {
                for ((r, &x), &q) in r.iter_mut().zip(xs).zip(&q) {
                    *r = (-d).mul_add(q as f32, x);
                }
                QuantActs::quantize_block(&r, &mut q2).0
            }
        };
        for ((&x, &q), &q2) in xs.iter().zip(&q).zip(&q2) {
            let (p1, p2) = (d as f64 * q as f64, d2 as f64 * q2 as f64);
            let e = x as f64 - p1 - p2;
            err += e * e;
            first += p1 * p1;
            second += p2 * p2;
        }
    }
    (err.sqrt(), first.sqrt() + second.sqrt())
}

/// For each row of `x`, the product [`IntActivations::Bits16`] adds to [`super::matmul_int`]'s:
/// that of the residual its 8-bit quantization leaves, quantized to 8 bits. `a + b`, `a` from
/// [`super::matmul_int`], has the bits of [`matmul_int_with`] at 16 bits: the second tier of
/// [`crate::greedy_head`], for the rows 8 bits leave undecided.
pub(crate) fn matmul_int_residual(x: &[f32], m: usize, w: &IntPacked, y: &mut [f32]) {
    let path = Path::detect();
    check_call(path, x, m, w, y);
    let first = QuantActs::new(x, m, w.k);
    let mut r = vec![0f32; m * w.k];
    first.residual(&x[..m * w.k], &mut r);
    run(path, &QuantActs::new(&r, m, w.k), m, w, y);
}

impl QuantActs {
    /// `x - d q` per value, with each block's scale `d` and quants `q` (once rounded).
    fn residual(&self, x: &[f32], r: &mut [f32]) {
        let blocks = x.chunks_exact(QK).zip(r.chunks_exact_mut(QK));
        for (((xs, rs), qs), &d) in blocks.zip(self.q.chunks_exact(QK)).zip(&self.d) {
            for ((r, &x), &q) in rs.iter_mut().zip(xs).zip(qs) {
                *r = (-d).mul_add(q as f32, x);
            }
        }
    }

    /// Rows `self[0], other[0], self[1], other[1], ...`: both have the same shape.
    fn interleave(&self, other: &Self) -> Self {
        let (nb, m) = (self.nb, self.d.len() / self.nb);
        let mut both = Self {
            nb,
            q: Vec::with_capacity(2 * self.q.len()),
            d: Vec::with_capacity(2 * m * nb),
            s: Vec::with_capacity(2 * m * nb),
            ds: Vec::with_capacity(2 * m * nb),
        };
        for i in 0..m {
            for a in [self, other] {
                both.q.extend_from_slice(a.row(i));
                let blocks = i * nb..(i + 1) * nb;
                both.d.extend_from_slice(&a.d[blocks.clone()]);
                both.s.extend_from_slice(&a.s[blocks.clone()]);
                both.ds.extend_from_slice(&a.ds[blocks]);
            }
        }
        both
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::qkernels::tests::DTYPES;
    use crate::testing::quantized_matrix;

    fn product(path: Path, acts: IntActivations, x: &[f32], m: usize, w: &IntPacked) -> Vec<f32> {
        let mut y = vec![f32::NAN; m * w.rows()];
        matmul_int_with_on(path, acts, x, m, w, &mut y);
        y
    }

    /// Values in -1..1 with one outlier per 32 (up to 40 in magnitude), as a hidden state has.
    fn activations(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len)
            .map(|i| match i % QK == 7 {
                true => rng.gen_range(-40.0f32..40.0),
                false => rng.gen_range(-1.0f32..1.0),
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// With 16-bit activations too, every path equals the portable one bit for bit, and
        /// every row of a batch equals that row multiplied alone.
        #[test]
        fn paths_agree_and_batches_are_invariant(
            d in 0..DTYPES.len(), n in 1..70usize, blocks in 1..7usize, m in 1..=20usize, seed: u64,
        ) {
            let k = blocks * QK;
            let (bytes, _) = quantized_matrix(DTYPES[d], n, k, seed);
            let w = IntPacked::from_ggml(DTYPES[d], &bytes, n, k).unwrap();
            let x = activations(m * k, seed ^ 1);
            let bits16 = IntActivations::Bits16;
            let want = product(Path::Portable, bits16, &x, m, &w);
            for path in Path::ALL.into_iter().filter(|p| p.available()) {
                let got = product(path, bits16, &x, m, &w);
                prop_assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{:?} {:?}", path, DTYPES[d]
                );
                for i in 0..m {
                    let alone = product(path, bits16, &x[i * k..(i + 1) * k], 1, &w);
                    prop_assert_eq!(&alone[..], &got[i * n..(i + 1) * n], "{:?} row {}", path, i);
                }
            }
        }
    }

    /// The residual's 8 bits take the error of 8-bit activations down by two orders of
    /// magnitude: against the exact product over the dequantized weights, the largest error of
    /// 16-bit activations is under a hundredth of 8-bit ones' (the quantization step shrinks
    /// ~254x; the f32 sums' rounding is what remains).
    #[test]
    fn sixteen_bit_activations_are_a_hundred_times_closer_to_the_exact_product() {
        let (n, k, m) = (64, 512, 4);
        for dtype in DTYPES {
            let (bytes, dense) = quantized_matrix(dtype, n, k, 3);
            let w = IntPacked::from_ggml(dtype, &bytes, n, k).unwrap();
            let x = activations(m * k, 4);
            let worst = |acts| {
                let y = product(Path::detect(), acts, &x, m, &w);
                let mut worst = 0f64;
                for (i, xi) in x.chunks_exact(k).enumerate() {
                    for (j, wj) in dense.chunks_exact(k).enumerate() {
                        let exact: f64 =
                            xi.iter().zip(wj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        worst = worst.max((y[i * n + j] as f64 - exact).abs());
                    }
                }
                worst
            };
            let (e8, e16) = (worst(IntActivations::Bits8), worst(IntActivations::Bits16));
            assert!(
                e16 * 100.0 < e8,
                "{dtype:?}: 16-bit error {e16} vs 8-bit {e8}"
            );
        }
    }

    /// The residual's product added to the 8-bit one is the 16-bit product, bit for bit.
    #[test]
    fn the_residual_product_completes_the_8_bit_one() {
        let (n, k, m) = (40, 96, 3);
        let (bytes, _) = quantized_matrix(GgmlDType::Q8_0, n, k, 7);
        let w = IntPacked::from_ggml(GgmlDType::Q8_0, &bytes, n, k).unwrap();
        let x = activations(m * k, 8);
        let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
        crate::qkernels::matmul_int(&x, m, &w, &mut a);
        matmul_int_residual(&x, m, &w, &mut b);
        let sum: Vec<u32> = a.iter().zip(&b).map(|(a, b)| (a + b).to_bits()).collect();
        let want = product(Path::detect(), IntActivations::Bits16, &x, m, &w);
        assert_eq!(sum, want.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    }

    #[test]
    fn eight_bits_is_the_plain_product() {
        let (bytes, _) = quantized_matrix(GgmlDType::Q4_1, 40, 96, 5);
        let w = IntPacked::from_ggml(GgmlDType::Q4_1, &bytes, 40, 96).unwrap();
        let x = activations(3 * 96, 6);
        let mut plain = vec![0f32; 3 * 40];
        crate::qkernels::matmul_int(&x, 3, &w, &mut plain);
        assert_eq!(
            product(Path::detect(), IntActivations::Bits8, &x, 3, &w),
            plain
        );
    }

    #[test]
    fn spec_values_round_trip() {
        for acts in [IntActivations::Bits8, IntActivations::Bits16] {
            assert_eq!(IntActivations::parse(&acts.to_string()), Some(acts));
        }
        assert_eq!(IntActivations::parse("32"), None);
    }
}
