//! The greedy token of an exact output head without all its exact logits: an integer pass bounds
//! every logit, and the exact f32 kernel scores only the tokens that can still win.
//!
//! The verify model's head (SmolLM2's tied q8_0 embedding: 49152 rows, ~21% of a forward's
//! multiply-adds) costs one exact f32 FMA chain per logit, while a greedy step needs only the
//! argmax. The integer kernels ([`crate::qkernels`]) multiply the same q8_0 blocks against
//! activations quantized to 8 bits in a third of the time at eight rows. Their logit `C_j` is not
//! the exact `L_j`, but it is within a bound `B_j` this module proves (below), so only tokens with
//! `C_j + B_j >= max_i (C_i - B_i)` can hold the maximum: those are scored by the head as stored
//! (the same kernel and bits as the whole head's), and the first of the highest wins, as
//! [`crate::kernels::argmax`] picks. The token is the one the whole head's logits give, always.
//! Where the 8-bit bound leaves too many candidates (a flat distribution), the row's 8-bit
//! residual is multiplied too (16-bit activations, [`IntActivations::Bits16`]: a bound ~250x
//! tighter); a row that still has too many, or whose bound cannot be formed (non-finite values),
//! takes the whole head.
//!
//! The bound, for one activation row `x` (`k` values, `k / 32` blocks) and head row `w` (q8_0:
//! `w_i = d q_i`, exact in f32), with `u = 2^-24`, `g(n) = n u / (1 - n u)`, `S = sum w_i x_i`
//! (exact), `x̂` the values the quantized activations stand for (`d q`, plus the residual's `d'
//! q'` at 16 bits) and `δ = x - x̂`:
//! - exact chain: `L` is `k` fused multiply-adds in order from zero, one rounding each, so
//!   `|L - S| <= g(k) sum |w_i x_i| <= g(k) |w| |x|` (Cauchy-Schwarz);
//! - quantized activations: `|S - sum w_i x̂_i| = |sum w_i δ_i| <= |w| |δ|`;
//! - integer pass: per part, exact integer sums per block, one rounded scale product and one
//!   fused multiply-add per block into one accumulator; at 16 bits one more rounding adds the two
//!   parts. So `|sum w_i x̂_i - C| <= g(k / 32 + 2) (|w| |d q| + |w| |d' q'|)`.
//!
//! So `B_j = |w_j| E` with `E = g(k) |x| + |δ| + g(k / 32 + 2) (|d q| + |d' q'|)`, per activation
//! row (its norms computed in f64 from the quantization itself), and per head row its norm `|w_j|`
//! (computed at load, rounded up). `E` is widened by 2^-30 of itself (the f64 arithmetic that
//! forms it) and the comparisons by a margin for underflow and f64 rounding. Each row's result
//! depends on that row alone: batch-invariant, as the head is.

use std::sync::Arc;

use crate::kernels;
use crate::linear::{Batching, Linear, Weights};
use crate::qexact::BlockPacked;
use crate::qkernels::{
    matmul_int, matmul_int_residual, quantization_norms, IntActivations, IntPacked, Path,
};
use crate::ModelError;

/// f32's unit roundoff.
const U: f64 = 1.0 / (1u64 << 24) as f64;

/// Rows with more candidates than this share of the vocabulary (and than [`MIN_CANDIDATES`]) go on
/// to the next tier: scoring that many apart would cost more than it saves.
const MAX_SHARE: usize = 16;
const MIN_CANDIDATES: usize = 64;

/// An exact output head's integer copy and row norms, for [`Self::argmax`].
#[derive(Clone)]
pub struct GreedyHead {
    /// The exact head this was built from ([`Self::built_from`]).
    source: Arc<BlockPacked>,
    /// The head's own q8_0 blocks, for the integer kernels.
    packed: IntPacked,
    /// `|w_j|`, each rounded up to the next f32.
    norms: Vec<f32>,
    norm_max: f64,
}

impl GreedyHead {
    /// For a head of q8_0 blocks widened exactly ([`Weights::Blocked`]), on a CPU whose integer
    /// kernels are SIMD (on the portable path the integer pass saves nothing); `None` otherwise,
    /// and for a head with a non-finite scale.
    pub fn new(head: &Linear) -> Result<Option<Self>, ModelError> {
        if Path::detect() == Path::Portable {
            return Ok(None);
        }
        Self::for_any_cpu(head)
    }

    /// [`Self::new`] on whatever path the integer kernels take here (tests run it everywhere).
    pub(crate) fn for_any_cpu(head: &Linear) -> Result<Option<Self>, ModelError> {
        let (n, k) = (head.out_features(), head.in_features());
        let Weights::Blocked(source) = head.weights() else {
            return Ok(None);
        };
        if source.kind() != crate::qexact::BlockKind::Q8_0 {
            return Ok(None);
        }
        let mut norms = Vec::with_capacity(n);
        let rows = (0..n).filter_map(|j| source.q8_0_row(j)).inspect(|row| {
            norms.push(row_norm(row));
        });
        let packed = IntPacked::from_q8_0_rows(n, k, rows)?;
        if norms.iter().any(|v| !v.is_finite()) {
            return Ok(None);
        }
        let norm_max = norms.iter().fold(0f32, |a, &v| a.max(v)) as f64;
        Ok(Some(Self {
            source: source.clone(),
            packed,
            norms,
            norm_max,
        }))
    }

    /// Where the integer copy lies: start address and bytes (for huge pages).
    pub fn span(&self) -> (usize, usize) {
        self.packed.span()
    }

    /// Whether `head` is the matrix this was built from (the same storage), so that
    /// [`Self::argmax`] gives its tokens.
    pub fn built_from(&self, head: &Linear) -> bool {
        matches!(head.weights(), Weights::Blocked(w) if Arc::ptr_eq(w, &self.source))
    }

    /// The greedy token of each of `rows` rows of `x`: what [`crate::kernels::argmax`] of
    /// `head`'s logits gives (through the whole head if `head` is not the matrix this was built
    /// from).
    pub fn argmax(&self, head: &Linear, x: &[f32], rows: usize) -> Result<Vec<u32>, ModelError> {
        let x = &x[..rows * head.in_features()];
        let mut tokens = vec![0u32; rows];
        if !self.built_from(head) {
            whole_argmax(head, x, &(0..rows).collect::<Vec<_>>(), &mut tokens)?;
            return Ok(tokens);
        }
        let found = self.screen(x, rows);
        let narrowed: Vec<(usize, &[u32])> = (found.iter().enumerate())
            .filter_map(|(r, ids)| Some((r, ids.as_deref()?)))
            .collect();
        let mut whole = best_candidates(head, x, &narrowed, &mut tokens)?;
        whole.extend((0..rows).filter(|&r| found[r].is_none()));
        whole_argmax(head, x, &whole, &mut tokens)?;
        Ok(tokens)
    }

    /// Each row's candidates ([`Self::candidates`]): from its product at 8-bit activations, or
    /// where that leaves too many, at 16 (the residual's product added, a second pass over the
    /// head for those rows only); `None` where neither narrows it.
    fn screen(&self, x: &[f32], rows: usize) -> Vec<Option<Vec<u32>>> {
        let (n, k) = (self.packed.rows(), self.packed.cols());
        let mut coarse = vec![0f32; rows * n];
        matmul_int(x, rows, &self.packed, &mut coarse);
        let mut found: Vec<Option<Vec<u32>>> = (x.chunks_exact(k).zip(coarse.chunks_exact(n)))
            .map(|(xi, ci)| self.candidates(IntActivations::Bits8, xi, ci))
            .collect();
        let undecided: Vec<usize> = (0..rows).filter(|&r| found[r].is_none()).collect();
        if undecided.is_empty() {
            return found;
        }
        let mut residual = vec![0f32; undecided.len() * n];
        let xs = gather(x, k, &undecided);
        matmul_int_residual(&xs, undecided.len(), &self.packed, &mut residual);
        for (&r, b) in undecided.iter().zip(residual.chunks_exact(n)) {
            let c = &mut coarse[r * n..(r + 1) * n];
            // `a + b`: the bits of the product at 16-bit activations.
            c.iter_mut().zip(b).for_each(|(a, b)| *a += b);
            found[r] = self.candidates(IntActivations::Bits16, &x[r * k..(r + 1) * k], c);
        }
        found
    }

    /// The ascending ids whose exact logit can be the row's maximum, given its integer logits
    /// `c`; `None` where the bound fails or leaves too many ([`MAX_SHARE`]).
    fn candidates(&self, acts: IntActivations, x: &[f32], c: &[f32]) -> Option<Vec<u32>> {
        let e = error_scale(acts, x)?;
        let top = kernels::argmax(c) as usize;
        let c_top = c[top] as f64;
        let spread = (self.norms[top] as f64 + self.norm_max) * e;
        // Every candidate j has c_j >= max_i (c_i - B_i) - B_j >= c_top - B_top - B_j.
        let floor = below(c_top - spread - margin(c_top.abs() + spread))?;
        let near: Vec<u32> = (0..c.len() as u32)
            .filter(|&j| c[j as usize] >= floor)
            .collect();
        if near.len() > (c.len() / MAX_SHARE).max(MIN_CANDIDATES) {
            return None;
        }
        let bound = |j: u32| self.norms[j as usize] as f64 * e;
        let low = near
            .iter()
            .map(|&j| c[j as usize] as f64 - bound(j))
            .fold(f64::NEG_INFINITY, f64::max);
        let cut = low - margin(c_top.abs() + 2.0 * spread);
        Some(
            near.into_iter()
                .filter(|&j| c[j as usize] as f64 + bound(j) >= cut)
                .collect(),
        )
    }
}

/// `E` of the module doc for one activation row, widened for its own f64 rounding; `None` when
/// `x` holds a non-finite value.
fn error_scale(acts: IntActivations, x: &[f32]) -> Option<f64> {
    let g = |n: f64| n * U / (1.0 - n * U);
    let norm_x = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    if !norm_x.is_finite() {
        return None;
    }
    let (delta, parts) = quantization_norms(acts, x);
    let (k, blocks) = (x.len() as f64, (x.len() / 32) as f64);
    let e = g(k) * norm_x + delta + g(blocks + 2.0) * parts;
    Some(e * (1.0 + 2f64.powi(-30)))
}

/// A margin for comparisons of values up to `scale` in magnitude: f64 rounding of the sums that
/// form them (~2^-52 of `scale` each), and the absolute error that underflow can add to both
/// chains (at most ~2^-125 over a few thousand roundings below f32's normal range).
fn margin(scale: f64) -> f64 {
    scale * 2f64.powi(-40) + 2f64.powi(-100)
}

/// The largest f32 at or below `v`, if `v` is finite.
fn below(v: f64) -> Option<f32> {
    if !v.is_finite() {
        return None;
    }
    let f = v as f32;
    Some(if f as f64 > v { f.next_down() } else { f })
}

/// `|w|` of a row of q8_0 blocks, rounded up to f32 (infinite if a scale is not finite).
fn row_norm(row: &[u8]) -> f32 {
    const BLOCK: usize = 34;
    let mut sum = 0f64;
    for block in row.chunks_exact(BLOCK) {
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f64();
        let q2: i64 = block[2..].iter().map(|&q| (q as i8 as i64).pow(2)).sum();
        sum += d * d * q2 as f64;
    }
    // The squares and sum round by ~2^-52 each: well inside this widening.
    let norm = sum.sqrt() * (1.0 + 2f64.powi(-40));
    if !norm.is_finite() {
        return f32::INFINITY;
    }
    let up = norm as f32;
    if (up as f64) < norm {
        up.next_up()
    } else {
        up
    }
}

/// For each row `r` and its ascending candidates `ids` in `narrowed`, the first of the highest
/// exact logits among `ids` into `tokens[r]` (the whole row's argmax, since `ids` holds every id
/// that can reach the maximum). The union of the candidates is scored in one pass; returns the
/// rows that met a NaN there (the whole row's argmax skips NaNs, which the bound says nothing of).
fn best_candidates(
    head: &Linear,
    x: &[f32],
    narrowed: &[(usize, &[u32])],
    tokens: &mut [u32],
) -> Result<Vec<usize>, ModelError> {
    if narrowed.is_empty() {
        return Ok(Vec::new());
    }
    let k = head.in_features();
    let mut union: Vec<u32> = narrowed
        .iter()
        .flat_map(|(_, ids)| ids.iter().copied())
        .collect();
    union.sort_unstable();
    union.dedup();
    let rows: Vec<usize> = narrowed.iter().map(|&(r, _)| r).collect();
    let mut exact = vec![0f32; rows.len() * union.len()];
    head.select_rows(&union)?.forward(
        &gather(x, k, &rows),
        rows.len(),
        &mut exact,
        Batching::Invariant,
    )?;
    let mut nan = Vec::new();
    for (&(r, ids), scored) in narrowed.iter().zip(exact.chunks_exact(union.len())) {
        let at = |id: &u32| scored[union.binary_search(id).expect("a candidate")];
        let values: Vec<f32> = ids.iter().map(at).collect();
        match values.iter().any(|v| v.is_nan()) {
            true => nan.push(r),
            false => tokens[r] = ids[kernels::argmax(&values) as usize],
        }
    }
    Ok(nan)
}

/// `tokens[r]` for each row `r` of `rows`: the argmax of the whole head's logits, in one pass.
fn whole_argmax(
    head: &Linear,
    x: &[f32],
    rows: &[usize],
    tokens: &mut [u32],
) -> Result<(), ModelError> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = head.out_features();
    let mut logits = vec![0f32; rows.len() * n];
    let xs = gather(x, head.in_features(), rows);
    head.forward(&xs, rows.len(), &mut logits, Batching::Invariant)?;
    for (&r, row) in rows.iter().zip(logits.chunks_exact(n)) {
        tokens[r] = kernels::argmax(row);
    }
    Ok(())
}

/// Rows `rows` of the `k`-wide rows of `x`, in that order.
fn gather(x: &[f32], k: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&r| &x[r * k..(r + 1) * k])
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qkernels::matmul_int_with;
    use crate::testing::{quantized_matrix, test_values};
    use candle_core::quantized::GgmlDType;
    use proptest::prelude::*;

    const ACTS: [IntActivations; 2] = [IntActivations::Bits8, IntActivations::Bits16];

    /// A q8_0 head of the `n` rows `values` (`k` wide), rows `copies[i].1` overwritten by rows
    /// `copies[i].0` (exact ties), widened exactly as the verify model's head is.
    fn head_of(values: &[f32], n: usize, k: usize, copies: &[(usize, usize)]) -> Linear {
        let t = candle_core::Tensor::from_slice(values, (n, k), &candle_core::Device::Cpu);
        let q = candle_core::quantized::QTensor::quantize(&t.unwrap(), GgmlDType::Q8_0).unwrap();
        let mut bytes = q.data().unwrap().to_vec();
        let row = bytes.len() / n;
        for &(from, to) in copies {
            let src = bytes[from % n * row..][..row].to_vec();
            bytes[to % n * row..][..row].copy_from_slice(&src);
        }
        let packed = BlockPacked::from_ggml(GgmlDType::Q8_0, &bytes, n, k).unwrap();
        Linear::new(Weights::Blocked(Arc::new(packed)), n, k).unwrap()
    }

    fn head(n: usize, k: usize, seed: u64, copies: &[(usize, usize)]) -> Linear {
        head_of(&test_values(n * k, seed), n, k, copies)
    }

    fn greedy(head: &Linear) -> GreedyHead {
        GreedyHead::for_any_cpu(head).unwrap().unwrap()
    }

    fn logits(head: &Linear, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; head.out_features()];
        head.forward(x, 1, &mut y, Batching::Invariant).unwrap();
        y
    }

    /// One row's candidates from its integer product at `acts`.
    fn candidates_at(g: &GreedyHead, acts: IntActivations, x: &[f32]) -> Option<Vec<u32>> {
        let mut c = vec![0f32; g.packed.rows()];
        matmul_int_with(acts, x, 1, &g.packed, &mut c);
        g.candidates(acts, x, &c)
    }

    proptest! {
        /// The screened argmax is the whole head's, ties to the first id included, for batches
        /// of rows some of which point along a head row (a clear winner and its copies).
        #[test]
        fn the_greedy_token_is_the_whole_heads(
            n in 1usize..300, blocks in 1usize..6, seed: u64,
            copies in proptest::collection::vec((0usize..300, 0usize..300), 0..8),
            scale in 0.01f32..100.0, rows in 1usize..5,
        ) {
            let k = 32 * blocks;
            let head = head(n, k, seed, &copies);
            let greedy = greedy(&head);
            let mut x: Vec<f32> = test_values(rows * k, seed ^ 1).iter().map(|v| v * scale).collect();
            if rows > 1 {
                // Row 1 along head row `copies[0].0` (or 0): its copies tie with it.
                let j = copies.first().map_or(0, |c| c.0 % n) as u32;
                head.rows_into(&[j], &mut x[k..2 * k]).unwrap();
                prop_assert!(greedy.screen(&x[k..2 * k], 1)[0].is_some(), "not screened");
            }
            let got = greedy.argmax(&head, &x, rows).unwrap();
            for (r, xi) in x.chunks_exact(k).enumerate() {
                prop_assert_eq!(got[r], kernels::argmax(&logits(&head, xi)), "row {}", r);
            }
        }

        /// Every exact logit lies within its bound of the integer one, at 8 and 16 bits.
        #[test]
        fn the_bound_holds(
            n in 1usize..200, blocks in 1usize..20, seed: u64, scale in 0.001f32..1000.0,
            wide: bool,
        ) {
            let (k, acts) = (32 * blocks, ACTS[wide as usize]);
            let head = head(n, k, seed, &[]);
            let greedy = greedy(&head);
            let x: Vec<f32> = test_values(k, seed ^ 2).iter().map(|v| v * scale).collect();
            let mut coarse = vec![0f32; n];
            matmul_int_with(acts, &x, 1, &greedy.packed, &mut coarse);
            let e = error_scale(acts, &x).unwrap();
            for (j, (&l, &c)) in logits(&head, &x).iter().zip(&coarse).enumerate() {
                let gap = (l as f64 - c as f64).abs();
                prop_assert!(gap <= greedy.norms[j] as f64 * e, "row {}: {} > {}", j, gap, e);
            }
        }
    }

    /// A row along one head row leaves that row alone as the candidate: the screen narrows.
    #[test]
    fn a_clear_winner_is_the_only_candidate() {
        let (n, k) = (4096, 256);
        let head = head(n, k, 5, &[]);
        let greedy = greedy(&head);
        let other = self::head(n, k, 6, &[]);
        assert!(greedy.built_from(&head) && !greedy.built_from(&other));
        let mut x = vec![0f32; k];
        head.rows_into(&[1234], &mut x).unwrap();
        for acts in ACTS {
            assert_eq!(candidates_at(&greedy, acts, &x), Some(vec![1234]), "{acts}");
        }
        // Another head's tokens are its own, not this one's.
        let want = kernels::argmax(&logits(&other, &x));
        assert_ne!(want, 1234, "the other head shows nothing");
        assert_eq!(greedy.argmax(&other, &x, 1).unwrap(), vec![want]);
    }

    /// Rows whose logits lie closer than the 8-bit bound take the 16-bit pass, which decides.
    #[test]
    fn close_logits_take_the_second_tier() {
        let (n, k) = (1024, 256);
        let base = test_values(k, 6);
        let noise = test_values(n * k, 7);
        let rows: Vec<f32> = (0..n * k).map(|i| base[i % k] + 0.05 * noise[i]).collect();
        let head = head_of(&rows, n, k, &[]);
        let greedy = greedy(&head);
        assert_eq!(candidates_at(&greedy, IntActivations::Bits8, &base), None);
        let narrowed = greedy
            .screen(&base, 1)
            .remove(0)
            .expect("16 bits narrow it");
        assert!(narrowed.len() <= 4, "{} candidates", narrowed.len());
        let want = kernels::argmax(&logits(&head, &base));
        assert_eq!(greedy.argmax(&head, &base, 1).unwrap(), vec![want]);
    }

    /// Rows the bound cannot narrow, or cannot be formed for, take the whole head.
    #[test]
    fn ties_everywhere_and_non_finite_rows_take_the_whole_head() {
        let (n, k) = (2 * MIN_CANDIDATES, 64);
        let copies: Vec<(usize, usize)> = (1..n).map(|j| (0, j)).collect();
        let head = head(n, k, 9, &copies);
        let greedy = greedy(&head);
        let x = test_values(k, 3);
        assert_eq!(greedy.screen(&x, 1), vec![None]);
        assert_eq!(greedy.argmax(&head, &x, 1).unwrap(), vec![0]);
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = test_values(k, 4);
            x[7] = bad;
            for acts in ACTS {
                assert_eq!(error_scale(acts, &x), None);
            }
            let want = kernels::argmax(&logits(&head, &x));
            assert_eq!(greedy.argmax(&head, &x, 1).unwrap(), vec![want]);
        }
    }

    #[test]
    fn only_exact_q8_0_heads_are_screened() {
        let (bytes, _) = quantized_matrix(GgmlDType::Q4_0, 64, 64, 1);
        let packed = BlockPacked::from_ggml(GgmlDType::Q4_0, &bytes, 64, 64).unwrap();
        let q4 = Linear::new(Weights::Blocked(Arc::new(packed)), 64, 64).unwrap();
        assert!(GreedyHead::for_any_cpu(&q4).unwrap().is_none());
        let dense = crate::linear::weights_from_f32(
            test_values(64 * 64, 1),
            64,
            64,
            crate::WeightFormat::F32,
        );
        let dense = Linear::new(dense.unwrap(), 64, 64).unwrap();
        assert!(GreedyHead::for_any_cpu(&dense).unwrap().is_none());
    }
}
