//! q4_1 with 8-bit block scales (`q4_1s8`): the stored nibbles, each block's f16 scale and minimum
//! re-coded against two f32 factors per row. 18 bytes a block instead of 20, 4.5 bits a weight
//! instead of 5: a tenth fewer bytes for a draft whose one-token forward streams its weights from
//! DRAM. The nibbles stay, so a weight moves by a small part of its block's quantization step; a
//! requantization to q4_0 (also 4.5 bits) moves them by whole steps and halves the draft's agreement.
//!
//! Per row, at load ([`IntPacked::with_coded_scales`]): the scale factor `fd` is the row's largest
//! block scale over 255, and a block's scale becomes `d' = fd * cd`, `cd` its nearest code (at least
//! 1 where the scale is not zero). The new scale would shift the block's mean, so the minimum first
//! moves to keep it, `m + (d - d') * mean(q)`; it is then coded relative to `d'`, as `d' * (fm *
//! cm)` with `cm` in -127..=127 and `fm` the row's largest `|m / d'|` over 127: a minimum's error
//! is a fraction of its own block's step however large other blocks of the row are. A block whose
//! scale is zero (all its weights equal) keeps no minimum; no checkpoint we know has one.

use half::f16;

use super::{IntPacked, Kind, QK};
use crate::ModelError;

/// A stored q4_1 block: f16 scale, f16 minimum, sixteen bytes of nibbles.
const Q4_1_BYTES: usize = 20;

/// A block's scale and minimum from its codes and its row's factors: what every kernel computes
/// (in this order of operations, so every path has the same bits).
#[inline]
pub(super) fn scales(fd: f32, fm: f32, cd: u8, cm: u8) -> (f32, f32) {
    let d = fd * cd as f32;
    (d, d * (fm * cm as i8 as f32))
}

impl IntPacked {
    /// This q4_1 matrix with its block scales coded to 8 bits (see the module doc). Only q4_1 has
    /// a minimum to code with its scale.
    pub fn with_coded_scales(&self) -> Result<Self, ModelError> {
        if self.kind != Kind::Q4_1 {
            return Err(ModelError::Unsupported(format!(
                "8-bit block scales code q4_1 matrices, not {}",
                self.kind.name()
            )));
        }
        let nb = self.k / QK;
        let mut out = Self::zeroed(Kind::Q4_1S8, self.n, self.k);
        let mut blocks = vec![[0u8; Q4_1_BYTES]; nb];
        for j in 0..self.n {
            for (b, block) in blocks.iter_mut().enumerate() {
                self.get_block(j, b, block);
            }
            let (factors, coded) = code_row(&blocks);
            out.set_factors(j, factors);
            for (b, block) in coded.iter().enumerate() {
                out.put_block(j, b, block);
            }
        }
        Ok(out)
    }
}

/// One row's q4_1 blocks coded: the row's factors `(fd, fm)`, and per block its two codes and
/// its sixteen bytes of nibbles.
fn code_row(blocks: &[[u8; Q4_1_BYTES]]) -> ((f32, f32), Vec<[u8; 2 + QK / 2]>) {
    let f16_at = |b: &[u8], o: usize| f16::from_le_bytes([b[o], b[o + 1]]).to_f32();
    let nibbles = |b: &[u8; Q4_1_BYTES]| {
        let q = |i: usize| (b[4 + i % 16] >> (4 * (i / 16)) & 0x0F) as f32;
        (0..QK).map(q).collect::<Vec<_>>()
    };
    let ds: Vec<f32> = blocks.iter().map(|b| f16_at(b, 0)).collect();
    // A scale's error moves each weight by `q` times it.
    let sq: Vec<f32> = blocks
        .iter()
        .map(|b| nibbles(b).iter().map(|q| q * q).sum())
        .collect();
    let fd = best_factor(&ds, &sq, 255.0, |d, f| f * code_scale(d, f) as f32);
    let cds: Vec<u8> = blocks
        .iter()
        .map(|b| code_scale(f16_at(b, 0), fd))
        .collect();
    let ratios: Vec<f32> = blocks
        .iter()
        .zip(&cds)
        .map(|(b, &cd)| {
            let (d, m, coded) = (f16_at(b, 0), f16_at(b, 2), fd * cd as f32);
            let qsum: u32 = b[4..]
                .iter()
                .map(|&q| (q & 0x0F) as u32 + (q >> 4) as u32)
                .sum();
            let kept_mean = m + (d - coded) * (qsum as f32 / QK as f32);
            if coded > 0.0 {
                kept_mean / coded
            } else {
                0.0
            }
        })
        .collect();
    // A ratio's error moves each of the block's weights by its scale times it.
    let d2: Vec<f32> = cds.iter().map(|&cd| (fd * cd as f32).powi(2)).collect();
    let fm = best_factor(&ratios, &d2, 127.0, |r, f| f * code_ratio(r, f) as f32);
    let coded = blocks
        .iter()
        .zip(cds.iter().zip(&ratios))
        .map(|(b, (&cd, &ratio))| {
            let mut out = [0u8; 2 + QK / 2];
            out[0] = cd;
            out[1] = code_ratio(ratio, fm) as u8;
            out[2..].copy_from_slice(&b[4..]);
            out
        })
        .collect();
    ((fd, fm), coded)
}

/// The factor that codes `values` with the least error weighted by `weights`, among those that
/// make one value's magnitude the largest code (`top`): a row whose largest value is an outlier
/// may lose less by clipping it than by coarse codes for all the others.
fn best_factor(values: &[f32], weights: &[f32], top: f32, decode: impl Fn(f32, f32) -> f32) -> f32 {
    let loss = |f: f32| -> f32 {
        let errors = values.iter().zip(weights);
        errors.map(|(&v, &w)| w * (v - decode(v, f)).powi(2)).sum()
    };
    let candidates = values.iter().map(|v| v.abs() / top).filter(|f| *f > 0.0);
    candidates
        .map(|f| (loss(f), f))
        .filter(|(l, _)| l.is_finite())
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map_or(0.0, |(_, f)| f)
}

/// The nearest code of scale `d` for factor `fd`: 0 only for a zero scale (or a factor that is
/// not a positive number); `as` saturates and turns NaN into 0.
fn code_scale(d: f32, fd: f32) -> u8 {
    if d > 0.0 && fd > 0.0 {
        (d / fd).round().clamp(1.0, 255.0) as u8
    } else {
        0
    }
}

/// The nearest code of a minimum's ratio to its scale, for factor `fm`.
fn code_ratio(ratio: f32, fm: f32) -> i8 {
    if fm > 0.0 {
        (ratio / fm).round().clamp(-127.0, 127.0) as i8
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::testing::quantized_matrix;

    fn coded(n: usize, k: usize, seed: u64) -> (IntPacked, IntPacked) {
        let (bytes, _) = quantized_matrix(GgmlDType::Q4_1, n, k, seed);
        let stored = IntPacked::from_ggml(GgmlDType::Q4_1, &bytes, n, k).unwrap();
        let coded = stored.with_coded_scales().unwrap();
        (stored, coded)
    }

    /// Each weight of a block whose codes are not the largest (which may clip an outlier, see
    /// [`best_factor`]) moves by at most what its codes allow: half a scale step for each of the
    /// (at most 15) steps it is away from its block's mean, plus half a minimum step; a block's
    /// mean moves by the latter alone.
    #[test]
    fn weights_move_by_at_most_half_a_code() {
        let (n, k) = (37, 256);
        let mut checked = 0;
        for seed in 0..4 {
            let (stored, coded) = coded(n, k, seed);
            let (mut want, mut got) = (vec![0f32; k], vec![0f32; k]);
            for j in 0..n {
                stored.row_into(j, &mut want);
                coded.row_into(j, &mut got);
                let (fd, fm) = coded.factors(j).unwrap();
                let mut block = [0u8; 2 + QK / 2];
                for (b, (w, g)) in want.chunks(QK).zip(got.chunks(QK)).enumerate() {
                    coded.get_block(j, b, &mut block);
                    if block[0] == 255 || (block[1] as i8).unsigned_abs() == 127 {
                        continue;
                    }
                    checked += 1;
                    let d = fd * block[0] as f32;
                    let min_err = d * fm / 2.0 * 1.0001 + 1e-6;
                    for (w, g) in w.iter().zip(g) {
                        assert!(
                            (w - g).abs() <= 15.0 * fd / 2.0 + min_err,
                            "{j} {b}: {w} {g}"
                        );
                    }
                    let mean = |v: &[f32]| v.iter().sum::<f32>() / QK as f32;
                    assert!((mean(w) - mean(g)).abs() <= min_err + 1e-5, "{j} {b}");
                }
            }
        }
        assert!(checked > 4 * n * k / QK / 2, "{checked}");
    }

    /// The chosen factor loses no more than coding by the largest value would, and clips an
    /// outlier whose exact code would coarsen every other value.
    #[test]
    fn the_factor_is_the_least_lossy_candidate() {
        let decode = |v: f32, f: f32| f * code_scale(v, f) as f32;
        let loss = |vs: &[f32], ws: &[f32], f: f32| -> f32 {
            vs.iter()
                .zip(ws)
                .map(|(&v, &w)| w * (v - decode(v, f)).powi(2))
                .sum()
        };
        let mut values: Vec<f32> = (0..40).map(|i| 0.01 + 0.0003 * i as f32).collect();
        let weights = vec![1.0; 41];
        let top = values.iter().fold(0f32, |a, &v| a.max(v)) / 255.0;
        let f = best_factor(&values, &weights[..40], 255.0, decode);
        assert!(loss(&values, &weights, f) <= loss(&values, &weights, top));
        // A value only a little above the rest: clipping it costs more than it saves.
        values.push(0.03);
        let f = best_factor(&values, &weights, 255.0, decode);
        assert_eq!(f, 0.03 / 255.0);
        // A far outlier with little weight: clipped.
        values[40] = 100.0;
        let mut light = weights.clone();
        light[40] = 1e-12;
        let f = best_factor(&values, &light, 255.0, decode);
        assert!(f < 1.0 / 255.0, "{f}");
        assert!(loss(&values, &light, f) < loss(&values, &light, 100.0 / 255.0));
    }

    #[test]
    fn codes_are_a_tenth_smaller_and_keep_the_nibbles() {
        let (n, k) = (40, 576);
        let (stored, coded) = coded(n, k, 5);
        assert_eq!(coded.type_name(), "q4_1s8");
        // 18 of 20 bytes a block, plus 8 bytes of factors a row.
        assert_eq!(coded.bytes(), stored.bytes() / 20 * 18 + 48 * 8);
        let (mut a, mut b) = ([0u8; Q4_1_BYTES], [0u8; 2 + QK / 2]);
        for j in 0..n {
            for blk in 0..k / QK {
                stored.get_block(j, blk, &mut a);
                coded.get_block(j, blk, &mut b);
                assert_eq!(a[4..], b[2..]);
            }
        }
        assert!(coded.with_coded_scales().is_err());
    }

    #[test]
    fn zero_and_constant_blocks_code_without_dividing_by_zero() {
        let mut row = [[0u8; Q4_1_BYTES]; 2];
        // A zero block, and a block of equal values: scale 0, minimum 1.
        row[1][2..4].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        let ((fd, fm), codes) = code_row(&row);
        assert_eq!((fd, fm), (0.0, 0.0));
        assert!(codes.iter().all(|c| c[..2] == [0, 0]));
        assert_eq!(scales(fd, fm, 0, 0), (0.0, 0.0));
        // A corrupt file's infinite scale codes without panicking.
        row[0][0..2].copy_from_slice(&f16::INFINITY.to_le_bytes());
        let _ = code_row(&row);
    }
}
