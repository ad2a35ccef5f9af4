//! A screened output head for a draft model: a coarse copy of the head picks each row's likely
//! tokens, the head as stored scores them.
//!
//! The output head is the largest matrix of a small model (SmolLM2-135M's tied q8_0 embedding is
//! 30 MB of the draft's 96 MB per token), and a draft only needs its top token right. A q4_0
//! requantization of the head (16 MB) ranks the whole vocabulary almost as the stored head does:
//! on 6144 positions of English prose and Python the stored head's argmax was within the coarse
//! head's top 32 every time, top 16 in 99.9% of them. So each row reads the coarse head, then
//! the stored head's rows of its `keep` best candidates only, which get their exact logits;
//! every other token keeps its coarse logit (an estimate, so a sampling draft still sees the whole
//! vocabulary). Each row's result depends on that row alone: the screen is batch-invariant.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;

use crate::linear::{Batching, Linear, Weights};
use crate::qkernels::{abs_max, IntPacked};
use crate::ModelError;

/// Candidates a row scores with the stored head when none is asked for (see the module doc).
pub const DEFAULT_KEEP: usize = 32;

/// The coarse copy's block type: the smallest one the integer kernels run.
const COARSE: GgmlDType = GgmlDType::Q4_0;

/// Rows requantized at a time at load, to bound the f32 copy a requantization needs.
const LOAD_CHUNK: usize = 1024;

/// A coarse copy of an output head and how many candidates each row rescores.
#[derive(Clone)]
pub struct ScreenedHead {
    coarse: Linear,
    keep: usize,
}

impl ScreenedHead {
    /// Requantizes `head` to q4_0, `LOAD_CHUNK` rows at a time. Needs rows whose width is a
    /// multiple of q4_0's 32-value block.
    pub fn new(head: &Linear, keep: usize) -> Result<Self, ModelError> {
        let (n, k) = (head.out_features(), head.in_features());
        if keep == 0 || !k.is_multiple_of(COARSE.block_size()) {
            return Err(ModelError::Unsupported(format!(
                "cannot screen a {n}x{k} output head with {keep} candidates: rows must be a \
                 multiple of {} wide",
                COARSE.block_size()
            )));
        }
        let mut blocks = Vec::with_capacity(n * k / COARSE.block_size() * COARSE.type_size());
        let mut rows = vec![0f32; LOAD_CHUNK * k];
        for first in (0..n).step_by(LOAD_CHUNK) {
            let ids: Vec<u32> = (first as u32..n.min(first + LOAD_CHUNK) as u32).collect();
            head.rows_into(&ids, &mut rows)?;
            quantize_q4_0(&rows[..ids.len() * k], &mut blocks);
        }
        let coarse = IntPacked::from_ggml(COARSE, &blocks, n, k)?;
        Ok(Self {
            coarse: Linear::new(Weights::Int(Arc::new(coarse)), n, k)?,
            keep: keep.min(n),
        })
    }

    /// The coarse copy's weights.
    pub fn coarse(&self) -> &Linear {
        &self.coarse
    }

    /// Bytes read and multiply-adds per row: the coarse head, then `keep` rows of the stored one.
    pub fn cost(&self, head: &Linear) -> (usize, usize) {
        let (n, k) = (head.out_features(), head.in_features());
        (
            self.coarse.bytes() + head.bytes() * self.keep / n,
            (n + self.keep) * k,
        )
    }

    /// `y[rows, vocab]`: the coarse head's logits, with the stored `head`'s exact ones for each
    /// row's `keep` best candidates.
    pub fn forward(
        &self,
        head: &Linear,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        batching: Batching,
    ) -> Result<(), ModelError> {
        let (n, k) = (head.out_features(), head.in_features());
        self.coarse.forward(x, rows, y, batching)?;
        let mut exact = vec![0f32; self.keep];
        for (xi, yi) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)).take(rows) {
            let ids = top_k(yi, self.keep);
            head.select_rows(&ids)?
                .forward(xi, 1, &mut exact, batching)?;
            for (&j, &v) in ids.iter().zip(&exact) {
                yi[j as usize] = v;
            }
        }
        Ok(())
    }
}

/// `xs` (whole 32-value blocks) as GGUF q4_0 blocks appended to `out`: ggml's reference
/// quantizer, bit for bit as candle's `BlockQ4_0::from_float` computes it (tested), without its
/// tensor copies: the scale is the first value of largest magnitude over -8 (stored as f16), and
/// each value `x` becomes `min(15, trunc(x / scale + 8.5))`, saturating at 0.
fn quantize_q4_0(xs: &[f32], out: &mut Vec<u8>) {
    const QK: usize = 32;
    for block in xs.chunks_exact(QK) {
        // The first value reaching the largest magnitude (NaN never does): where ggml's running
        // `amax < |x|` comparison last moved. +0 when every value is zero or NaN, as there.
        let amax = abs_max(block);
        let max = match amax > 0.0 {
            true => block
                .iter()
                .copied()
                .find(|v| v.abs() == amax)
                .unwrap_or(0.0),
            false => 0.0,
        };
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        // `min(15, v as u8)`: the cast saturates (NaN to 0), so clamping first changes nothing.
        let mut q = [0u8; QK];
        for (o, &x) in q.iter_mut().zip(block) {
            *o = (x * id + 8.5).clamp(0.0, 15.0) as u8;
        }
        let mut qs = [0u8; QK / 2];
        for (j, o) in qs.iter_mut().enumerate() {
            *o = q[j] | (q[QK / 2 + j] << 4);
        }
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&qs);
    }
}

/// The indices of the `k` largest values (NaN never counts as large), in no particular order.
fn top_k(values: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(values.len());
    let mut best: Vec<(f32, u32)> = (0..k as u32).map(|i| (values[i as usize], i)).collect();
    let mut low = lowest(&best);
    for (i, &v) in values.iter().enumerate().skip(k) {
        // Most values lose this one comparison; a win replaces the current lowest.
        if v > best[low].0 || best[low].0.is_nan() {
            best[low] = (v, i as u32);
            low = lowest(&best);
        }
    }
    best.into_iter().map(|(_, i)| i).collect()
}

/// Where the smallest kept value is (a NaN first, so any number replaces it).
fn lowest(best: &[(f32, u32)]) -> usize {
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    (0..best.len())
        .min_by(|&a, &b| key(best[a].0).total_cmp(&key(best[b].0)))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn top_k_finds_the_largest_values(
            values in proptest::collection::vec(-1e3f32..1e3, 1..300),
            k in 1usize..40,
        ) {
            let mut got: Vec<f32> = top_k(&values, k).iter().map(|&i| values[i as usize]).collect();
            let mut want = values.clone();
            want.sort_by(|a, b| b.total_cmp(a));
            want.truncate(k);
            got.sort_by(|a, b| b.total_cmp(a));
            prop_assert_eq!(got, want);
        }
    }

    /// Candle's quantizer, the definition [`quantize_q4_0`] follows.
    fn candle_q4_0(xs: &[f32]) -> Vec<u8> {
        use candle_core::quantized::QTensor;
        use candle_core::{Device, Tensor};
        let t = Tensor::from_slice(xs, (1, xs.len()), &Device::Cpu).unwrap();
        QTensor::quantize(&t, COARSE)
            .unwrap()
            .data()
            .unwrap()
            .to_vec()
    }

    proptest! {
        #[test]
        fn the_q4_0_quantizer_is_candles(
            values in proptest::collection::vec(-4f32..4.0, 32..=96),
            specials in proptest::collection::vec((0usize..96, 0usize..8), 0..6),
        ) {
            let mut xs = values[..values.len() / 32 * 32].to_vec();
            let edge = [0.0, -0.0, f32::NAN, 1e-40, -3.5, 3.5, f32::INFINITY, -1e30];
            for (at, e) in specials {
                let n = xs.len();
                xs[at % n] = edge[e];
            }
            let mut ours = Vec::new();
            quantize_q4_0(&xs, &mut ours);
            prop_assert_eq!(ours, candle_q4_0(&xs));
        }
    }

    /// A sweep through values whose scaled magnitudes fall next to the rounding boundaries of a
    /// scale that is not a power of two: where a fused `x * id + 8.5` would truncate otherwise.
    #[test]
    fn the_q4_0_quantizer_rounds_as_candles_does() {
        let mut xs = Vec::new();
        for i in 0..31 * 4096 {
            if xs.len() % 32 == 0 {
                xs.push(-7.0);
            }
            xs.push(-7.0 + i as f32 * (14.0 / (31.0 * 4096.0)));
        }
        xs.resize(xs.len().next_multiple_of(32), 0.0);
        let mut ours = Vec::new();
        quantize_q4_0(&xs, &mut ours);
        assert_eq!(ours, candle_q4_0(&xs));
    }

    #[test]
    fn the_q4_0_quantizer_keeps_the_first_of_tied_magnitudes() {
        for block in [[0f32; 32], [-0.0; 32], [f32::NAN; 32]] {
            let mut ours = Vec::new();
            quantize_q4_0(&block, &mut ours);
            assert_eq!(ours, candle_q4_0(&block));
        }
        let mut tied = [0.5f32; 32];
        (tied[3], tied[9]) = (-2.0, 2.0);
        let mut ours = Vec::new();
        quantize_q4_0(&tied, &mut ours);
        assert_eq!(ours, candle_q4_0(&tied));
        tied[3] = 2.0;
        tied[9] = -2.0;
        ours.clear();
        quantize_q4_0(&tied, &mut ours);
        assert_eq!(ours, candle_q4_0(&tied));
    }

    #[test]
    fn top_k_never_keeps_a_nan_over_a_number() {
        let v = [f32::NAN, 1.0, f32::NAN, 3.0, 2.0];
        let mut got = top_k(&v, 2);
        got.sort();
        assert_eq!(got, vec![3, 4]);
    }
}
