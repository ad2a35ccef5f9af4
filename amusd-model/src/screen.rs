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

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::linear::{quantized_weights, Batching, Linear};
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
            let t = Tensor::from_slice(&rows[..ids.len() * k], (ids.len(), k), &Device::Cpu)?;
            blocks.extend_from_slice(&QTensor::quantize(&t, COARSE)?.data()?);
        }
        let storage =
            candle_core::quantized::QStorage::from_data(blocks.into(), &Device::Cpu, COARSE)?;
        let coarse = QTensor::new(storage, (n, k))?;
        Ok(Self {
            coarse: Linear::new(quantized_weights(coarse)?, n, k)?,
            keep: keep.min(n),
        })
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

    #[test]
    fn top_k_never_keeps_a_nan_over_a_number() {
        let v = [f32::NAN, 1.0, f32::NAN, 3.0, 2.0];
        let mut got = top_k(&v, 2);
        got.sort();
        assert_eq!(got, vec![3, 4]);
    }
}
