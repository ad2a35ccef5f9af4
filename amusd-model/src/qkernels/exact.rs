//! The verify model's f32 arithmetic over integer panels: the stored blocks widened to exactly
//! their dequantized f32 values, a 64-row panel at a time, for [`crate::kernels::matmul_widened`].
//! What lets a draft worker compute part of the verify model's prefill with the draft's own
//! matrices when both are the same checkpoint ([`crate::Llama::verify_twin`]): no second copy
//! of the weights. Each value is what candle's `to_float` gives (and [`crate::qexact`]'s
//! widening, see its module doc: `q * d` is exact, so `q * d + m` rounds once), so the products
//! have the bits of the verify model's (tested against [`crate::qexact::matmul`]).

use super::*;
use crate::kernels::PANEL;

impl IntPacked {
    /// Whether [`Self::widen_panel`] gives the checkpoint's own f32 values: q4_0, q4_1 and q8_0
    /// blocks as stored (not a k-quant taken as q4_1, not coded scales).
    pub fn widens_exactly(&self) -> bool {
        self.stored && matches!(self.kind, Kind::Q4_0 | Kind::Q4_1 | Kind::Q8_0)
    }

    /// Rows `PANEL * b..` as one f32 panel, reduction-major (`dst[p * PANEL + c]` is row
    /// `PANEL * b + c`'s value at step `p`), each value exactly its dequantized f32; rows past
    /// the matrix are zero.
    pub fn widen_panel(&self, b: usize, dst: &mut [f32]) {
        assert!(
            self.widens_exactly(),
            "{} does not widen exactly",
            self.kind.name()
        );
        assert_eq!(dst.len(), self.k * PANEL);
        for s in 0..PANEL / ROWS {
            let p = b * (PANEL / ROWS) + s;
            if p >= self.panels() {
                for step in dst.chunks_exact_mut(PANEL) {
                    step[s * ROWS..(s + 1) * ROWS].fill(0.0);
                }
                continue;
            }
            for blk in 0..self.k / QK {
                let at = blk * self.panel_block_bytes();
                let block = &self.panel(p)[at..at + self.panel_block_bytes()];
                let out = &mut dst[blk * QK * PANEL + s * ROWS..];
                self.widen_block(block, out);
            }
        }
    }

    /// One block of a panel's [`ROWS`] rows into `out` (step `t` of row `r` at `t * PANEL + r`).
    /// Plain loops over the rows, each step's sixteen values one vector where the compiler has
    /// the registers for it.
    fn widen_block(&self, block: &[u8], out: &mut [f32]) {
        let f16_at = |o: usize| f16::from_le_bytes([block[o], block[o + 1]]).to_f32();
        let d: [f32; ROWS] = std::array::from_fn(|r| f16_at(2 * r));
        let m: [f32; ROWS] = match self.kind.has_min() {
            true => std::array::from_fn(|r| f16_at(2 * (ROWS + r))),
            false => [0.0; ROWS],
        };
        let quants = &block[2 * ROWS * self.kind.scales()..];
        // Row `r`'s bytes `4g..4g + 4` of the block's quants, as one word.
        let word = |g: usize, r: usize| {
            let at = (g * ROWS + r) * 4;
            u32::from_le_bytes(quants[at..at + 4].try_into().unwrap())
        };
        for g in 0..self.kind.quant_bytes() / 4 {
            let words: [u32; ROWS] = std::array::from_fn(|r| word(g, r));
            for i in 0..4 {
                let bytes: [u32; ROWS] = std::array::from_fn(|r| words[r] >> (8 * i) & 0xFF);
                let (lo, rest) = out[(4 * g + i) * PANEL..].split_at_mut(ROWS);
                match self.kind {
                    Kind::Q8_0 => widen_row(lo, &bytes, |q| q as u8 as i8 as f32, &d, None),
                    _ => {
                        let centre = self.kind.centre() as f32;
                        // `q * d` is exact, so `q * d + m` rounds once, as `fma(q, d, m)` and
                        // candle do; `q - centre` is exact too.
                        let min = self.kind.has_min().then_some(&m);
                        let low = |q: u32| (q & 0x0F) as f32 - centre;
                        widen_row(lo, &bytes, low, &d, min);
                        let hi = &mut rest[(QK / 2) * PANEL - ROWS..][..ROWS];
                        widen_row(hi, &bytes, |q| (q >> 4) as f32 - centre, &d, min);
                    }
                }
            }
        }
    }
}

/// `out[r] = q(bytes[r]) * d[r] (+ m[r])` for the [`ROWS`] rows of one step.
#[inline(always)]
fn widen_row(
    out: &mut [f32],
    bytes: &[u32; ROWS],
    q: impl Fn(u32) -> f32,
    d: &[f32; ROWS],
    m: Option<&[f32; ROWS]>,
) {
    match m {
        Some(m) => {
            for r in 0..ROWS {
                out[r] = q(bytes[r]) * d[r] + m[r];
            }
        }
        None => {
            for r in 0..ROWS {
                out[r] = q(bytes[r]) * d[r];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qexact::BlockPacked;

    /// The exact product over integer panels has the bits of the verify model's kernels over the
    /// same blocks, for every kind that widens exactly and any batch.
    #[test]
    fn widened_integer_panels_give_the_verify_model_bits() {
        let (n, k) = (80, 96);
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = crate::testing::quantized_matrix(dtype, n, k, 7).0;
            let int = IntPacked::from_ggml(dtype, &w, n, k).unwrap();
            let blocked = BlockPacked::from_ggml(dtype, &w, n, k).unwrap();
            assert!(int.widens_exactly());
            for m in [1, 5, 17, 70] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7919) % 263) as f32 / 37.0 - 3.5)
                    .collect();
                let (mut want, mut got) = (vec![0.0; m * n], vec![1.0; m * n]);
                crate::qexact::matmul(&x, m, &blocked, &mut want);
                crate::kernels::matmul_widened(&x, m, n, k, &mut got, |b, dst| {
                    int.widen_panel(b, dst)
                });
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{dtype:?}, {m} rows");
            }
        }
    }

    #[test]
    fn converted_and_coded_panels_do_not_widen_exactly() {
        let (n, k) = (16, 256);
        let q4k = crate::testing::quantized_matrix(GgmlDType::Q4K, n, k, 3).0;
        assert!(!IntPacked::from_ggml(GgmlDType::Q4K, &q4k, n, k)
            .unwrap()
            .widens_exactly());
        let q41 = crate::testing::quantized_matrix(GgmlDType::Q4_1, n, k, 3).0;
        let stored = IntPacked::from_ggml(GgmlDType::Q4_1, &q41, n, k).unwrap();
        assert!(!stored.with_coded_scales().unwrap().widens_exactly());
        assert!(stored.select_rows(&[3, 1]).widens_exactly());
    }
}
