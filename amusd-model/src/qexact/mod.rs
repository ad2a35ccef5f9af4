//! Block-quantized weights kept as stored and multiplied in exact f32 arithmetic: the verify model's
//! kernels for GGUF checkpoints.
//!
//! A `model.gguf:f32` verify model means "f32 arithmetic on the checkpoint's values". Expanding a
//! q4_1 checkpoint to f32 at load costs 5.4x the memory and 5.4x the bytes read per token, and
//! decoding is bound by those bytes. Here the blocks stay in memory as stored (repacked into panels
//! of the same bits) and each weight is widened in registers to exactly the f32 value candle's
//! `to_float` produces, then enters the same FMA chain as [`crate::kernels::matmul_packed`]: one
//! chain per output over the reduction in index order, from zero. So every output has the bits of
//! the packed-f32 product over the dequantized matrix, whatever the batch size or instruction set.
//!
//! Why widening is exact: every supported block type dequantizes as `q * d` or `q * d + m`, with
//! `q` an integer of at most 8 bits and `d`, `m` f16 values. An f16 has 11 significant bits, so
//! `q * d` has at most 19 and is exact in f32: `fl(fl(q * d) + m) == fma(q, d, m)`, one instruction.
//!
//! The k-quants (q3_k, q4_k, q5_k, q6_k) scale 256-value super-blocks by an f16 `d` times a 6-
//! or 8-bit integer per sub-block, and candle multiplies those first: `d1 = d * sc` (at most 19
//! significant bits, exact; q3_k's `sc` is less 32), then `d1 * q - m1` with `m1 = dmin * m`
//! (exact too) for q4_k and q5_k, or `d1 * q` for q3_k and q6_k (19 + 5 bits: still exact). So
//! they take the same form with f32 scales: each 32-step group keeps `d1` and `-m1` as f32 (q3_k's
//! and q6_k's sub-blocks are 16 values: two scales a group), computed at load exactly as candle
//! computes them, and the quants as stored (those of at most four bits as nibbles, the others as
//! bytes). q2_k's 16-value sub-blocks have a scale and a minimum each, `d * (sc & 15)` and
//! `dmin * (sc >> 4)` (15 significant bits), so its groups keep two of both.
//!
//! q8_k's `d` is an f32, so candle's `d * q` (24 + 8 bits) rounds; with no offset the widened
//! weight is that product, rounded once by the same multiplication, so it has its bits too.

use candle_core::quantized::GgmlDType;

use crate::gguf::check_block_matrix;
use crate::kernels::{prefetch_range, PANEL};
use crate::ModelError;

/// Reduction steps per scale (GGUF's block size for every supported type).
pub const GROUP: usize = 32;

/// The block types this module widens in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

/// Values in a k-quant super-block.
const QK_K: usize = 256;

/// One group of [`GROUP`] reduction steps of one output: its scales and integers, widened as
/// [`BlockKind::value`] says. Scales are f16 bits, or f32 bits for the k-quants.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Group {
    /// The scale of steps `0..16` and of `16..32` (the same but for [`BlockKind::split`] types).
    d: [u32; 2],
    /// The offset of steps `0..16` and of `16..32` (0 for types without one).
    m: [u32; 2],
    q: [i8; GROUP],
}

impl BlockKind {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q8_1 => Self::Q8_1,
            GgmlDType::Q2K => Self::Q2K,
            GgmlDType::Q3K => Self::Q3K,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            GgmlDType::Q8K => Self::Q8K,
            _ => return None,
        })
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q8_1 => GgmlDType::Q8_1,
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3K => GgmlDType::Q3K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q8K => GgmlDType::Q8K,
        }
    }

    /// Values in one stored GGUF block.
    fn block_values(self) -> usize {
        if self.f32_scales() {
            QK_K
        } else {
            GROUP
        }
    }

    /// Bytes of one stored GGUF block.
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Q8K => 292,
        }
    }

    /// Whether values are kept as 4-bit nibbles (else one signed byte each): the types whose
    /// integers span at most 16 values.
    fn nibbles(self) -> bool {
        matches!(
            self,
            Self::Q4_0 | Self::Q4_1 | Self::Q2K | Self::Q3K | Self::Q4K
        )
    }

    /// Whether the type adds an offset `m` after scaling.
    fn has_offset(self) -> bool {
        matches!(
            self,
            Self::Q4_1 | Self::Q5_1 | Self::Q2K | Self::Q4K | Self::Q5K
        )
    }

    /// Whether scales and offsets are f32 (the k-quants'), else f16.
    fn f32_scales(self) -> bool {
        matches!(
            self,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K | Self::Q8K
        )
    }

    /// Whether a group's second half has its own scale (and offset): the k-quants with 16-value
    /// sub-blocks.
    fn split(self) -> bool {
        matches!(self, Self::Q2K | Self::Q3K | Self::Q6K)
    }

    /// What a stored nibble exceeds the integer it means by (q4_0 stores `q + 8`; q3_k's
    /// integers, -4 to 3, are kept as `q + 4`).
    fn bias(self) -> i32 {
        match self {
            Self::Q4_0 => 8,
            Self::Q3K => 4,
            _ => 0,
        }
    }

    /// Scale sets a group of a panel holds, in this order: the scales, the offsets if the type
    /// has them, then for [`Self::split`] types the second half's scales and offsets.
    fn scale_sets(self) -> usize {
        (1 + self.has_offset() as usize) * (1 + self.split() as usize)
    }

    /// Bytes of one group of a panel: [`Self::scale_sets`] of [`PANEL`] values (f16, or f32 for
    /// the k-quants), then the values reduction-major (`GROUP / 2` bytes of nibble pairs or
    /// `GROUP` bytes per output).
    fn group_bytes(self) -> usize {
        let sets = self.scale_sets();
        let width = if self.f32_scales() { 4 } else { 2 };
        let values = if self.nibbles() { GROUP / 2 } else { GROUP } * PANEL;
        sets * width * PANEL + values
    }

    /// Decodes one stored block into its groups, as candle's `to_float` computes them.
    fn decode(self, b: &[u8], groups: &mut [Group]) {
        match self {
            Self::Q2K => decode_q2k(b, groups),
            Self::Q3K => decode_q3k(b, groups),
            Self::Q4K | Self::Q5K => decode_q45k(self == Self::Q5K, b, groups),
            Self::Q6K => decode_q6k(b, groups),
            Self::Q8K => decode_q8k(b, groups),
            _ => {
                let g = &mut groups[0];
                let (d, m) = self.decode32(b, &mut g.q);
                (g.d, g.m) = ([d.into(); 2], [m.into(); 2]);
            }
        }
    }

    /// Decodes one stored block of 32 values: `d`, `m` (f16 bits; `m` is 0 without an offset)
    /// and the integers `q` with `value = q * d + m`, as candle's `to_float` computes them.
    fn decode32(self, b: &[u8], q: &mut [i8; GROUP]) -> (u16, u16) {
        let le16 = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let d = le16(0);
        let m = if self.has_offset() { le16(2) } else { 0 };
        // q8_1 stores its block's sum where the others store an offset: unused when widening.
        let rest = match self.has_offset() || self == Self::Q8_1 {
            true => &b[4..],
            false => &b[2..],
        };
        match self {
            Self::Q4_0 | Self::Q4_1 => {
                let bias = self.bias() as i8;
                for j in 0..GROUP / 2 {
                    q[j] = (rest[j] & 0x0F) as i8 - bias;
                    q[j + GROUP / 2] = (rest[j] >> 4) as i8 - bias;
                }
            }
            Self::Q5_0 | Self::Q5_1 => {
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..];
                let sub = if self == Self::Q5_0 { 16 } else { 0 };
                for j in 0..GROUP / 2 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    q[j] = ((qs[j] & 0x0F) | h0) as i8 - sub;
                    q[j + GROUP / 2] = ((qs[j] >> 4) | h1) as i8 - sub;
                }
            }
            Self::Q8_0 | Self::Q8_1 => {
                for (o, &v) in q.iter_mut().zip(&rest[..GROUP]) {
                    *o = v as i8;
                }
            }
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K | Self::Q8K => {
                unreachable!("k-quants are decoded whole")
            }
        }
        (d, m)
    }

    /// Writes one group as column `c` of a panel's group (laid out as [`Self::group_bytes`]
    /// says).
    fn put(self, group: &mut [u8], c: usize, g: &Group) {
        let (off, split) = (self.has_offset(), self.split());
        let sets = [
            (g.d[0], true),
            (g.m[0], off),
            (g.d[1], split),
            (g.m[1], off && split),
        ];
        let mut vals = 0;
        for (bits, _) in sets.into_iter().filter(|s| s.1) {
            if self.f32_scales() {
                group[vals + 4 * c..][..4].copy_from_slice(&bits.to_le_bytes());
                vals += 4 * PANEL;
            } else {
                group[vals + 2 * c..][..2].copy_from_slice(&(bits as u16).to_le_bytes());
                vals += 2 * PANEL;
            }
        }
        let out = &mut group[vals + c..];
        if self.nibbles() {
            let bias = self.bias() as i8;
            for (s, pair) in g.q.chunks_exact(2).enumerate() {
                let (lo, hi) = ((pair[0] + bias) as u8, (pair[1] + bias) as u8);
                out[s * PANEL] = lo | (hi << 4);
            }
        } else {
            for (t, &v) in g.q.iter().enumerate() {
                out[t * PANEL] = v as u8;
            }
        }
    }

    /// Step `t`'s exact f32 value in group `g`.
    #[inline(always)]
    fn value(self, g: &Group, t: usize) -> f32 {
        let (d, m) = (g.d[t / (GROUP / 2)], g.m[t / (GROUP / 2)]);
        let (d, m) = match self.f32_scales() {
            true => (f32::from_bits(d), f32::from_bits(m)),
            false => (
                half::f16::from_bits(d as u16).to_f32(),
                half::f16::from_bits(m as u16).to_f32(),
            ),
        };
        let q = g.q[t] as f32;
        if self.has_offset() {
            // q * d is exact (see the module doc), so this rounds once, like candle's `q * d + m`.
            (q * d) + m
        } else {
            q * d
        }
    }
}

/// Sub-block `j`'s 6-bit scale and minimum in a q4_k or q5_k block's 12 scale bytes.
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// A q4_k block (`d`, `dmin`, 12 scale bytes, 128 nibble bytes) or a q5_k block (the same with
/// 32 high-bit bytes before the nibbles) as its eight groups: sub-block `j`'s scale `d * sc`
/// and offset `-(dmin * m)`, as candle computes `d1` and `m1`.
fn decode_q45k(five: bool, b: &[u8], groups: &mut [Group]) {
    let f16 = |i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let (d, dmin, scales) = (f16(0), f16(2), &b[4..16]);
    let (qh, qs) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&b[..0], &b[16..144])
    };
    for (j, g) in groups[..QK_K / GROUP].iter_mut().enumerate() {
        let (sc, m) = scale_min_k4(j, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        (g.d, g.m) = ([d1.to_bits(); 2], [(-m1).to_bits(); 2]);
        let nibbles = &qs[j / 2 * 32..][..32];
        for (l, q) in g.q.iter_mut().enumerate() {
            let low = if j % 2 == 0 {
                nibbles[l] & 0xF
            } else {
                nibbles[l] >> 4
            };
            let high = if five { ((qh[l] >> j) & 1) << 4 } else { 0 };
            *q = (low | high) as i8;
        }
    }
}

/// q4_k (`five` false) or q5_k blocks (row-major, whole) as q4_1 / q5_1 blocks of the same
/// quants, eight to a block: each group's scale `d * sc` and minimum `-(dmin * m)` as candle
/// computes them, rounded to f16. Not the exact arithmetic (an f16 keeps 11 of their up to 17
/// significant bits): what lets a q4_k / q5_k draft run the integer kernels
/// ([`crate::qkernels::IntPacked`]).
pub(crate) fn k_quant_as_q_1(five: bool, blocks: &[u8]) -> Vec<u8> {
    let kind = if five { BlockKind::Q5K } else { BlockKind::Q4K };
    let out_bytes = if five { 24 } else { 20 };
    let mut out = Vec::with_capacity(blocks.len() / kind.block_bytes() * 8 * out_bytes);
    let mut groups = [Group::default(); QK_K / GROUP];
    for block in blocks.chunks_exact(kind.block_bytes()) {
        decode_q45k(five, block, &mut groups);
        for g in &groups {
            let f16 = |bits: u32| half::f16::from_f32(f32::from_bits(bits)).to_le_bytes();
            out.extend(f16(g.d[0]));
            out.extend(f16(g.m[0]));
            if five {
                // q5_1's high bits: bit j of one little-endian word is element j's fifth bit.
                let high =
                    (g.q.iter().enumerate()).fold(0u32, |h, (j, &q)| h | ((q as u32 >> 4) << j));
                out.extend(high.to_le_bytes());
            }
            // q4_1 / q5_1 pair element j with element j + 16 in byte j.
            let nibble = |j: usize| g.q[j] as u8 & 0x0F;
            out.extend((0..GROUP / 2).map(|j| nibble(j) | nibble(j + GROUP / 2) << 4));
        }
    }
    out
}

/// A q2_k block (16 scale bytes, 64 bytes of 2-bit quants, `d`, `dmin`) as its eight groups,
/// each with its two 16-value sub-blocks' scales `d * (sc & 15)` and offsets `-(dmin * (sc >> 4))`,
/// as candle computes `dl` and `ml`.
fn decode_q2k(b: &[u8], groups: &mut [Group]) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let f16 = |i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let (d, dmin) = (f16(80), f16(82));
    for (g, group) in groups[..QK_K / GROUP].iter_mut().enumerate() {
        // Group g is the (g % 4)-th two-bit plane of the block's half g / 4.
        let (qs, shift) = (&qs[32 * (g / 4)..], 2 * (g % 4));
        let sc = |h: usize| scales[8 * (g / 4) + 2 * (g % 4) + h];
        group.d = [0, 1].map(|h| (d * (sc(h) & 0xF) as f32).to_bits());
        group.m = [0, 1].map(|h| (-(dmin * (sc(h) >> 4) as f32)).to_bits());
        for (l, q) in group.q.iter_mut().enumerate() {
            *q = ((qs[l] >> shift) & 3) as i8;
        }
    }
}

/// A q8_k block (`d` as f32, 256 signed bytes, 16 sums the widening does not need) as its
/// eight groups.
fn decode_q8k(b: &[u8], groups: &mut [Group]) {
    let d = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (group, qs) in groups[..QK_K / GROUP]
        .iter_mut()
        .zip(b[4..].chunks_exact(GROUP))
    {
        (group.d, group.m) = ([d; 2], [0; 2]);
        for (q, &v) in group.q.iter_mut().zip(qs) {
            *q = v as i8;
        }
    }
}

/// A q3_k block (32 high-bit bytes, 64 bytes of 2-bit quants, 12 bytes of 6-bit scales, `d`) as
/// its eight groups, each with its two 16-value sub-blocks' scales `d * (sc - 32)`, as candle
/// computes them.
fn decode_q3k(b: &[u8], groups: &mut [Group]) {
    let (hmask, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
    let d = half::f16::from_le_bytes([b[108], b[109]]).to_f32();
    // The 16 scales: low four bits from bytes 0-7, high two from bytes 8-11, two bits apiece.
    let sc = |i: usize| {
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0xF;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        (low | (high << 4)) as f32 - 32.0
    };
    for (g, group) in groups[..QK_K / GROUP].iter_mut().enumerate() {
        // Group g is the (g % 4)-th two-bit plane of the block's half g / 4.
        let (qs, shift) = (&qs[32 * (g / 4)..], 2 * (g % 4));
        group.d = [(d * sc(2 * g)).to_bits(), (d * sc(2 * g + 1)).to_bits()];
        group.m = [0; 2];
        for (l, q) in group.q.iter_mut().enumerate() {
            let low = ((qs[l] >> shift) & 3) as i8;
            *q = low - if hmask[l] & (1 << g) == 0 { 4 } else { 0 };
        }
    }
}

/// A q6_k block (128 low-nibble bytes, 64 high-bit bytes, 16 signed scales, `d`) as its eight
/// groups, each with its two 16-value sub-blocks' scales `d * sc`, as candle computes them.
fn decode_q6k(b: &[u8], groups: &mut [Group]) {
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    let d = half::f16::from_le_bytes([b[208], b[209]]).to_f32();
    for (i, g) in groups[..QK_K / GROUP].iter_mut().enumerate() {
        // Group i is the i % 4-th quarter of the block's half i / 4.
        let (half, c) = (i / 4, i % 4);
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        let s = |h: usize| (d * sc[8 * half + 2 * c + h] as i8 as f32).to_bits();
        (g.d, g.m) = ([s(0), s(1)], [0; 2]);
        for (l, q) in g.q.iter_mut().enumerate() {
            let byte = ql[l + 32 * (c % 2)];
            let low = if c < 2 { byte & 0xF } else { byte >> 4 };
            let high = (qh[l] >> (2 * c)) & 3;
            *q = (low | (high << 4)) as i8 - 32;
        }
    }
}

/// A block-quantized `[n, k]` matrix in panels of [`PANEL`] output rows: panel `b`'s group `g`
/// (reduction steps `32 g .. 32 g + 32`) is `BlockKind::group_bytes` long, holding the rows'
/// scales, offsets and values so that one vector load yields one step of consecutive outputs.
/// Rows past `n` in the last panel are zero.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockPacked {
    kind: BlockKind,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

/// Rows decoded from blocks, row-major, `k / GROUP` groups a row: the step between GGUF bytes
/// and panels, and back for stacking.
type Decoded = Vec<Group>;

impl BlockPacked {
    /// Repacks `bytes`, the row-major GGUF blocks of an `[n, k]` matrix of type `dtype`.
    pub fn from_ggml(
        dtype: GgmlDType,
        bytes: &[u8],
        n: usize,
        k: usize,
    ) -> Result<Self, ModelError> {
        let kind = BlockKind::from_ggml(dtype).ok_or_else(|| {
            ModelError::Unsupported(format!("{dtype:?} weights cannot be widened in registers"))
        })?;
        let (bv, bb) = (kind.block_values(), kind.block_bytes());
        check_block_matrix(dtype, bytes.len(), n, k, bv, bb)?;
        let (groups, gb) = (k / GROUP, kind.group_bytes());
        let mut data = vec![0u8; n.div_ceil(PANEL) * groups * gb];
        let mut dec = [Group::default(); QK_K / GROUP];
        let dec = &mut dec[..bv / GROUP];
        for (row, blocks) in bytes.chunks_exact(k / bv * bb).enumerate() {
            let panel = &mut data[row / PANEL * groups * gb..][..groups * gb];
            let mut out = panel.chunks_exact_mut(gb);
            for block in blocks.chunks_exact(bb) {
                kind.decode(block, dec);
                for (g, group) in dec.iter().zip(&mut out) {
                    kind.put(group, row % PANEL, g);
                }
            }
        }
        Ok(Self { kind, n, k, data })
    }

    fn pack(kind: BlockKind, n: usize, k: usize, dec: &Decoded) -> Self {
        let (groups, gb) = (k / GROUP, kind.group_bytes());
        let mut data = vec![0u8; n.div_ceil(PANEL) * groups * gb];
        for (row, dec) in dec.chunks_exact(groups).enumerate() {
            let panel = &mut data[row / PANEL * groups * gb..][..groups * gb];
            for (group, g) in panel.chunks_exact_mut(gb).zip(dec) {
                kind.put(group, row % PANEL, g);
            }
        }
        Self { kind, n, k, data }
    }

    /// The rows `rows` decoded, in that order.
    fn unpack(&self, rows: impl Iterator<Item = usize>) -> Decoded {
        rows.flat_map(|row| (0..self.k / GROUP).map(move |g| self.read(row, g)))
            .collect()
    }

    /// Row `row`'s group `g`.
    fn read(&self, row: usize, g: usize) -> Group {
        let (kind, gb) = (self.kind, self.kind.group_bytes());
        let c = row % PANEL;
        let base = (row / PANEL * (self.k / GROUP) + g) * gb;
        let width = if kind.f32_scales() { 4 } else { 2 };
        let at = |set: usize| {
            let i = base + set * width * PANEL + width * c;
            let mut b = [0u8; 4];
            b[..width].copy_from_slice(&self.data[i..i + width]);
            u32::from_le_bytes(b)
        };
        // A half's scale set and, after it, its offsets (as the kernels' `half_scales` read them).
        let off = kind.has_offset();
        let half = |set: usize| (at(set), if off { at(set + 1) } else { 0 });
        let first = half(0);
        let second = match kind.split() {
            true => half(1 + off as usize),
            false => first,
        };
        let sets = kind.scale_sets();
        let mut out = Group {
            d: [first.0, second.0],
            m: [first.1, second.1],
            q: [0; GROUP],
        };
        let vals = base + sets * width * PANEL;
        for (t, o) in out.q.iter_mut().enumerate() {
            *o = if self.kind.nibbles() {
                let b = self.data[vals + t / 2 * PANEL + c];
                let nib = if t % 2 == 0 { b & 0x0F } else { b >> 4 };
                nib as i8 - self.kind.bias() as i8
            } else {
                self.data[vals + t * PANEL + c] as i8
            };
        }
        out
    }

    /// The matrix whose rows are those of `parts` in order (same type and width).
    pub fn stack(parts: &[&Self]) -> Result<Self, ModelError> {
        let first = parts
            .first()
            .ok_or_else(|| ModelError::Shape("stacking no matrices".into()))?;
        if parts.iter().any(|p| p.kind != first.kind || p.k != first.k) {
            return Err(ModelError::Shape(
                "cannot fuse layers of different storage or width".into(),
            ));
        }
        let n = parts.iter().map(|p| p.n).sum();
        let panels: Vec<_> = parts.iter().map(|p| (p.n, p.data.as_slice())).collect();
        if let Some(data) = crate::kernels::whole_panels(&panels, PANEL) {
            return Ok(Self {
                kind: first.kind,
                n,
                k: first.k,
                data,
            });
        }
        let all: Decoded = parts.iter().flat_map(|p| p.unpack(0..p.n)).collect();
        Ok(Self::pack(first.kind, n, first.k, &all))
    }

    pub fn kind(&self) -> BlockKind {
        self.kind
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Where the weights lie: start address and bytes.
    pub fn span(&self) -> (usize, usize) {
        (self.data.as_ptr() as usize, self.data.len())
    }

    /// The matrix of rows `ids`, in that order (each below [`Self::rows`]).
    pub fn select_rows(&self, ids: &[u32]) -> Self {
        let dec = self.unpack(ids.iter().map(|&j| j as usize));
        Self::pack(self.kind, ids.len(), self.k, &dec)
    }

    fn panel(&self, b: usize) -> &[u8] {
        let len = self.k / GROUP * self.kind.group_bytes();
        &self.data[b * len..(b + 1) * len]
    }

    /// Row `row` as the GGUF q8_0 blocks it was packed from, if the matrix is q8_0: for the
    /// integer kernels' copy of a head ([`crate::greedy_head`]).
    pub fn q8_0_row(&self, row: usize) -> Option<Vec<u8>> {
        if self.kind != BlockKind::Q8_0 {
            return None;
        }
        let groups = self.k / GROUP;
        let mut out = Vec::with_capacity(groups * self.kind.block_bytes());
        for g in 0..groups {
            let group = self.read(row, g);
            out.extend_from_slice(&(group.d[0] as u16).to_le_bytes());
            out.extend(group.q.iter().map(|&q| q as u8));
        }
        Some(out)
    }

    /// Row `j` widened to f32 (`k` values): for embedding lookups.
    pub fn row_into(&self, j: usize, dst: &mut [f32]) {
        for (g, out) in dst.chunks_exact_mut(GROUP).take(self.k / GROUP).enumerate() {
            let group = self.read(j, g);
            for (t, o) in out.iter_mut().enumerate() {
                *o = self.kind.value(&group, t);
            }
        }
    }
}

/// The instruction sets [`matmul`] can run on; every one gives the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
}

impl Isa {
    /// Every instruction set, slowest first.
    pub const ALL: [Self; 3] = [Self::Portable, Self::Avx2, Self::Avx512];

    /// The best this CPU supports, detected at run time (per call, without allocating).
    pub fn detect() -> Self {
        Self::ALL
            .into_iter()
            .rev()
            .find(|isa| isa.supported())
            .unwrap_or(Self::Portable)
    }

    /// Every instruction set this CPU can run, slowest first (tests run them all).
    pub fn available() -> Vec<Self> {
        Self::ALL
            .into_iter()
            .filter(|isa| isa.supported())
            .collect()
    }

    /// Whether this CPU runs `self` (feature detection is cached by std: cheap per call).
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Self::Portable => true,
                Self::Avx2 => avx2,
                Self::Avx512 => avx2 && has!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Self::Portable
        }
    }
}

/// `y[i, j] = sum_p x[i, p] * w[j, p]` for `x: [m, k]`, `y: [m, n]` row-major: bit-identical to
/// [`crate::kernels::matmul_packed`] over the dequantized matrix.
pub fn matmul(x: &[f32], m: usize, w: &BlockPacked, y: &mut [f32]) {
    matmul_on(Isa::detect(), x, m, w, y)
}

impl Isa {
    /// The most rows one register tile of the direct path takes; larger batches below
    /// [`Isa::widen_once_rows`] go through it in tiles of nearly equal height, each widening the
    /// panel again. With AVX-512 (32 registers) up to 16 rows fit a tile a quarter of a panel wide
    /// (16 accumulators), so each weight is widened once, in registers, beside its FMAs. The
    /// verify model's forward at 300 positions (`EXACT=1 SPEC=f32 CTX=300 ROWS=m fwd_probe`, two
    /// alternating rounds against the buffer from 9 rows): m = 9 42.4 / 43.7 -> 30.3 / 35.9 ms,
    /// 12 53.3 / 53.3 -> 41.7 / 42.2, 16 66.3 / 75.7 -> 57.6 / 55.3; in tiles of at most 16 rows
    /// against the buffer, m = 20 67.0 vs 79.0, 24 90.4 vs 109.8, 32 107.8 vs 123.7, 48 159.5 vs
    /// 179.5, 64 205 / 239 vs 211 / 256 (level), 100 level. Tiles of up to 24 rows were no better.
    fn direct_rows(self) -> usize {
        match self {
            Self::Avx512 => 16,
            Self::Portable | Self::Avx2 => 8,
        }
    }

    /// Batches at least this large widen each group once into an f32 buffer shared by all rows;
    /// smaller ones widen in registers ([`Isa::direct_rows`]). Measured for AVX2 (q4_1 and q8_0
    /// gate/up, in cache, one core): m = 2 and 4 cost 1.3x and 1.5x of one row widened in
    /// registers, 2.3x and 2.5x through the buffer, and at m = 8 the buffer wins, 3.3x against
    /// 3.7x. With AVX-512 the two are level from 64 rows (above); the buffer keeps prefill.
    fn widen_once_rows(self) -> usize {
        match self {
            Self::Avx512 => 64,
            Self::Portable | Self::Avx2 => 9,
        }
    }
}

/// `m` rows as consecutive tiles of at most `max`, their heights differing by one at most.
fn row_tiles(m: usize, max: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let tiles = m.div_ceil(max);
    (0..tiles).map(move |t| t * m / tiles..(t + 1) * m / tiles)
}

/// [`matmul`] on a given instruction set, which must be in [`Isa::available`].
///
/// Small batches (decoding, verifications) widen each weight in registers straight into its
/// FMAs, in row tiles as tall as the registers allow: bandwidth is what decoding is short of, and
/// most of the widening runs on other ports than the FMAs, between them. Large ones (prefill) widen one group of a panel at
/// a time into an L1-resident f32 buffer and run every row over it, so each weight is widened once
/// per forward; accumulators carry across groups through memory, which holds f32 exactly, so each
/// output is still one FMA chain in order.
pub fn matmul_on(isa: Isa, x: &[f32], m: usize, w: &BlockPacked, y: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert!(x.len() >= m * k && y.len() >= m * n);
    assert!(isa.supported(), "{isa:?} on a CPU without it");
    let mut acc = vec![0f32; m * PANEL];
    let mut wide = vec![0f32; GROUP * PANEL];
    let rows: Vec<&[f32]> = x[..m * k].chunks_exact(k).collect();
    for b in 0..n.div_ceil(PANEL) {
        let (panel, j0) = (w.panel(b), b * PANEL);
        let cols = (n - j0).min(PANEL);
        if m < isa.widen_once_rows() {
            for tile in row_tiles(m, isa.direct_rows()) {
                let out = &mut acc[tile.start * PANEL..tile.end * PANEL];
                direct(isa, w.kind, &rows[tile], panel, out);
            }
        } else {
            let groups = k / GROUP;
            for g in 0..groups {
                let group = &panel[g * w.kind.group_bytes()..];
                // Panels lie one after the other: past a panel's end is the next panel, read next.
                let bytes = w.kind.group_bytes();
                prefetch_range(group.as_ptr().wrapping_add(WIDEN_AHEAD * bytes), bytes);
                widen_group(isa, w.kind, group, &mut wide);
                // A whole panel's last group leaves its sums in `y` itself.
                let out = (g + 1 == groups && cols == PANEL).then(|| (&mut y[j0..], n));
                let sums = Sums {
                    acc: &mut acc,
                    fresh: g == 0,
                    out,
                };
                gemm_group(isa, &x[g * GROUP..], m, k, &wide, sums);
            }
            if cols == PANEL {
                continue;
            }
        }
        for (i, a) in acc.chunks_exact(PANEL).enumerate() {
            y[i * n + j0..i * n + j0 + cols].copy_from_slice(&a[..cols]);
        }
    }
}

/// One group's running sums in [`gemm_group`]: row `i`'s `PANEL` sums are read from
/// `acc[i * PANEL..]`, or start from zero when `fresh` (a panel's first group), and are written
/// back there, or with `out = (rows, stride)` to `rows[i * stride..]` (a whole panel's last group,
/// straight into the output rather than through `acc` and a copy). Sums stored as f32 reload
/// exactly, so each output stays one FMA chain in order.
struct Sums<'a> {
    acc: &'a mut [f32],
    fresh: bool,
    out: Option<(&'a mut [f32], usize)>,
}

impl Sums<'_> {
    /// The rows of `m` sums, checked.
    fn rows(&mut self, m: usize) -> SumRows {
        assert!(self.acc.len() == m * PANEL, "gemm_group accumulators");
        let acc = self.acc.as_mut_ptr();
        let (dst, stride) = match &mut self.out {
            Some((rows, stride)) => {
                assert!(*stride >= PANEL && rows.len() >= (m - 1) * *stride + PANEL);
                (rows.as_mut_ptr(), *stride)
            }
            None => (acc, PANEL),
        };
        SumRows {
            src: acc.cast_const(),
            dst,
            stride,
            fresh: self.fresh,
        }
    }
}

/// [`Sums`] as the kernels take them: row `r`'s sums are read at `src + r * PANEL` (unless
/// `fresh`) and written at `dst + r * stride`; the two alias only as the same rows.
#[derive(Clone, Copy)]
struct SumRows {
    src: *const f32,
    dst: *mut f32,
    stride: usize,
    fresh: bool,
}

impl SumRows {
    /// The rows from row `r` on.
    ///
    /// # Safety
    /// Row `r` exists.
    unsafe fn starting_at(self, r: usize) -> Self {
        Self {
            src: self.src.add(r * PANEL),
            dst: self.dst.add(r * self.stride),
            ..self
        }
    }
}

/// At most [`Isa::direct_rows`] activation rows times one panel, widening in registers; `out`
/// holds `xs.len()` rows of [`PANEL`] outputs.
fn direct(isa: Isa, kind: BlockKind, xs: &[&[f32]], panel: &[u8], out: &mut [f32]) {
    match isa {
        Isa::Portable => portable::direct(kind, xs, panel, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::rows(kind, xs, panel, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::rows(kind, xs, panel, out),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 | Isa::Avx512 => {
            unreachable!("x86 instruction sets are never detected elsewhere")
        }
    }
}

/// Widens one group of a panel (`group` starts with it) into `wide`, `[GROUP][PANEL]` f32.
fn widen_group(isa: Isa, kind: BlockKind, group: &[u8], wide: &mut [f32]) {
    assert!(group.len() >= kind.group_bytes() && wide.len() == GROUP * PANEL);
    match isa {
        Isa::Portable => portable::widen_group(kind, group, wide),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::widen_group(kind, group, wide),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::widen_group(kind, group, wide),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 | Isa::Avx512 => {
            unreachable!("x86 instruction sets are never detected elsewhere")
        }
    }
}

/// `sums[i][c] += x[i][t] * wide[t][c]` over the group's steps `t` in order, one FMA each, for
/// every row `i < m` (row `i` of `x` starts at `x[i * k]`).
fn gemm_group(isa: Isa, x: &[f32], m: usize, k: usize, wide: &[f32], mut sums: Sums) {
    assert!(x.len() >= (m - 1) * k + GROUP && wide.len() == GROUP * PANEL);
    let rows = sums.rows(m);
    // SAFETY: `rows` asserted that its source holds `m * PANEL` sums and that its destination has
    // `PANEL` values at each of `m` rows `stride` apart; `x` and `wide` are as long as the tiles
    // read (asserted above).
    unsafe {
        match isa {
            Isa::Portable => portable::gemm_group(x, m, k, wide, rows),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::gemm_group(x, m, k, wide, rows),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::gemm_group(x, m, k, wide, rows),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => {
                unreachable!("x86 instruction sets are never detected elsewhere")
            }
        }
    }
}

/// The definition every SIMD path must match bit for bit: per output, one FMA chain over the
/// reduction in order, each weight widened by [`widen_scalar`].
mod portable {
    use super::*;

    pub fn direct(kind: BlockKind, xs: &[&[f32]], panel: &[u8], out: &mut [f32]) {
        let mut wide = vec![0f32; GROUP * PANEL];
        out.fill(0.0);
        for (g, group) in panel.chunks_exact(kind.group_bytes()).enumerate() {
            widen_group(kind, group, &mut wide);
            for (x, o) in xs.iter().zip(out.chunks_exact_mut(PANEL)) {
                // SAFETY: one row: `o` holds its PANEL sums, read and written in place.
                let dst = o.as_mut_ptr();
                let rows = SumRows {
                    src: dst,
                    dst,
                    stride: PANEL,
                    fresh: false,
                };
                unsafe { gemm_group(&x[g * GROUP..], 1, 0, &wide, rows) };
            }
        }
    }

    pub fn widen_group(kind: BlockKind, group: &[u8], wide: &mut [f32]) {
        let w = BlockPacked {
            kind,
            n: PANEL,
            k: GROUP,
            data: group[..kind.group_bytes()].to_vec(),
        };
        for c in 0..PANEL {
            let g = w.read(c, 0);
            for t in 0..GROUP {
                wide[t * PANEL + c] = kind.value(&g, t);
            }
        }
    }

    /// # Safety
    /// `sums` holds `m` rows.
    pub unsafe fn gemm_group(x: &[f32], m: usize, k: usize, wide: &[f32], sums: SumRows) {
        for i in 0..m {
            let row = sums.starting_at(i);
            let mut a = [0f32; PANEL];
            if !sums.fresh {
                a.copy_from_slice(std::slice::from_raw_parts(row.src, PANEL));
            }
            let xi = &x[i * k..i * k + GROUP];
            for (t, wt) in wide.chunks_exact(PANEL).enumerate() {
                for (a, w) in a.iter_mut().zip(wt) {
                    *a = xi[t].mul_add(*w, *a);
                }
            }
            std::slice::from_raw_parts_mut(row.dst, PANEL).copy_from_slice(&a);
        }
    }
}

/// Groups ahead of the one being widened that the widen-once path prefetches: the rows' FMAs over
/// a group take long enough to hide the memory latency of the next ones.
const WIDEN_AHEAD: usize = 2;

/// Groups ahead the SIMD paths prefetch when decoding; one group of a q4_1 panel is 1280 bytes.
#[cfg(target_arch = "x86_64")]
const PREFETCH_GROUPS: usize = 2;

/// How far past group `g`'s start (`gb` bytes a group, `panel_len` a panel) a strip of the direct
/// path prefetches. A panel taken in several column strips is read from memory once, by the
/// first strip; the later ones find it in cache. Prefetching only a few groups ahead, the memory
/// idles through those later strips and the first strip of the next panel waits on it: five rows
/// (two strips) of an uncached q8_0 gate/up took 1.48x the time of four (one strip). So the first
/// strip prefetches just ahead (from cache after the first panel, and into L1), and the later
/// ones fetch the next panel's group `g` (panels lie one after the other; a prefetch past the
/// last one's end reads nothing architecturally and never faults). Every later strip does, though
/// the first of them has fetched it already: with only that one, the verify model's 6-, 9- and
/// 12-row forwards were 2-10% slower (three alternating rounds).
#[cfg(target_arch = "x86_64")]
fn strip_prefetch(col: usize, gb: usize, panel_len: usize) -> usize {
    if col == 0 {
        PREFETCH_GROUPS * gb
    } else {
        panel_len
    }
}

/// [`BlockKind::group_bytes`]'s scale part as a constant of the SIMD kernels' type parameters.
#[cfg(target_arch = "x86_64")]
const fn scale_bytes<const OFF: bool, const F32: bool, const SPLIT: bool>() -> usize {
    let sets = (1 + OFF as usize) * (1 + SPLIT as usize);
    sets * if F32 { 4 } else { 2 } * PANEL
}

/// [`BlockKind::group_bytes`] as a constant of the SIMD kernels' type parameters.
#[cfg(target_arch = "x86_64")]
const fn group_bytes<const NIB: bool, const OFF: bool, const F32: bool, const SPLIT: bool>() -> usize
{
    scale_bytes::<OFF, F32, SPLIT>() + if NIB { GROUP / 2 } else { GROUP } * PANEL
}

/// `$f::<NIB, OFF, BIAS, F32, SPLIT>($args)` with the SIMD kernels' type parameters of block kind
/// `$kind`: nibbles or bytes, an offset (minimum) or not, the bias of a nibble, f32 scales (the
/// k-quants) and groups split into two scale halves. One table for every instruction set.
#[cfg(target_arch = "x86_64")]
macro_rules! by_kind {
    ($kind:expr, $f:ident($($arg:expr),*)) => {
        match $kind {
            BlockKind::Q4_0 => $f::<true, false, 8, false, false>($($arg),*),
            BlockKind::Q4_1 => $f::<true, true, 0, false, false>($($arg),*),
            BlockKind::Q5_0 | BlockKind::Q8_0 | BlockKind::Q8_1 => {
                $f::<false, false, 0, false, false>($($arg),*)
            }
            BlockKind::Q5_1 => $f::<false, true, 0, false, false>($($arg),*),
            BlockKind::Q2K => $f::<true, true, 0, true, true>($($arg),*),
            BlockKind::Q3K => $f::<true, false, 4, true, true>($($arg),*),
            BlockKind::Q4K => $f::<true, true, 0, true, false>($($arg),*),
            BlockKind::Q5K => $f::<false, true, 0, true, false>($($arg),*),
            BlockKind::Q6K => $f::<false, false, 0, true, true>($($arg),*),
            BlockKind::Q8K => $f::<false, false, 0, true, false>($($arg),*),
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{matmul_packed, Packed};
    use crate::testing::{quantized_matrix as quantized, test_values as vals};
    use proptest::prelude::*;

    const KINDS: [GgmlDType; 12] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q8_1,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q8K,
    ];

    /// Columns of `blocks` stored blocks of `dtype`.
    fn cols(dtype: GgmlDType, blocks: usize) -> usize {
        blocks * BlockKind::from_ggml(dtype).unwrap().block_values()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn q8_0_rows_are_the_stored_bytes() {
        let (n, k) = (70, 3 * GROUP);
        let (bytes, _) = quantized(GgmlDType::Q8_0, n, k, 11);
        let w = BlockPacked::from_ggml(GgmlDType::Q8_0, &bytes, n, k).unwrap();
        let rows: Vec<u8> = (0..n).flat_map(|j| w.q8_0_row(j).unwrap()).collect();
        assert_eq!(rows, bytes);
        let (q4, _) = quantized(GgmlDType::Q4_0, n, k, 11);
        let w = BlockPacked::from_ggml(GgmlDType::Q4_0, &q4, n, k).unwrap();
        assert_eq!(w.q8_0_row(0), None);
    }

    #[test]
    fn rows_widen_to_candles_dequantization() {
        let (n, k) = (70, 2 * QK_K);
        for dtype in KINDS {
            let (bytes, dense) = quantized(dtype, n, k, 7);
            let w = BlockPacked::from_ggml(dtype, &bytes, n, k).unwrap();
            let mut row = vec![0f32; k];
            for j in 0..n {
                w.row_into(j, &mut row);
                assert_eq!(
                    bits(&row),
                    bits(&dense[j * k..(j + 1) * k]),
                    "{dtype:?} row {j}"
                );
            }
        }
    }

    /// Every register tile height, several tiles of them, and the buffer path past each
    /// instruction set's threshold, every type and instruction set, with a partial last panel:
    /// each gives the reference's bits (the proptest below draws sizes at random).
    #[test]
    fn every_tile_height_equals_the_dequantized_f32_product() {
        let n = PANEL + 24;
        for dtype in KINDS {
            let k = cols(dtype, 2).min(QK_K);
            let (bytes, dense) = quantized(dtype, n, k, 11);
            let w = BlockPacked::from_ggml(dtype, &bytes, n, k).unwrap();
            let reference = Packed::from_rows(&dense, n, k);
            for m in (1..=20).chain([31, 33, 47, 63, 64, 65]) {
                let x = vals(m * k, m as u64);
                let mut want = vec![0f32; m * n];
                matmul_packed(&x, m, &reference, &mut want);
                for isa in Isa::available() {
                    let mut got = vec![f32::NAN; m * n];
                    matmul_on(isa, &x, m, &w, &mut got);
                    assert_eq!(bits(&want), bits(&got), "{dtype:?} {isa:?} m = {m}");
                }
            }
        }
    }

    #[test]
    fn row_tiles_cover_the_rows_in_nearly_equal_tiles() {
        for max in [1, 8, 16] {
            for m in 1..100 {
                let tiles: Vec<_> = row_tiles(m, max).collect();
                assert_eq!(tiles.len(), m.div_ceil(max), "m = {m}, max = {max}");
                assert_eq!((tiles[0].start, tiles[tiles.len() - 1].end), (0, m));
                assert!(tiles.windows(2).all(|t| t[0].end == t[1].start));
                let (lo, hi) = (
                    tiles.iter().map(|t| t.len()).min(),
                    tiles.iter().map(|t| t.len()).max(),
                );
                assert!(
                    hi.unwrap() <= max && hi.unwrap() - lo.unwrap() <= 1,
                    "m = {m}, max = {max}"
                );
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let (bytes, _) = quantized(GgmlDType::Q4_1, 4, 64, 1);
        assert!(BlockPacked::from_ggml(GgmlDType::Q4_1, &bytes[1..], 4, 64).is_err());
        assert!(BlockPacked::from_ggml(GgmlDType::Q4_1, &bytes, 4, 48).is_err());
        assert!(BlockPacked::from_ggml(GgmlDType::F16, &bytes, 4, 64).is_err());
        let (bytes, _) = quantized(GgmlDType::Q6K, 2, 256, 1);
        assert!(BlockPacked::from_ggml(GgmlDType::Q6K, &bytes, 4, 128).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Every output equals the packed-f32 product over candle's dequantized matrix, bit for
        /// bit, on every instruction set and batch size.
        #[test]
        fn matmul_equals_the_dequantized_f32_product(
            kind in 0..KINDS.len(), m in 1usize..70, n in 1usize..150, blocks in 1usize..5, seed: u64,
        ) {
            let dtype = KINDS[kind];
            let k = cols(dtype, blocks).min(2 * QK_K);
            let (bytes, dense) = quantized(dtype, n, k, seed);
            let w = BlockPacked::from_ggml(dtype, &bytes, n, k).unwrap();
            let x = vals(m * k, !seed);
            let mut want = vec![0f32; m * n];
            matmul_packed(&x, m, &Packed::from_rows(&dense, n, k), &mut want);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; m * n];
                matmul_on(isa, &x, m, &w, &mut got);
                prop_assert_eq!(bits(&want), bits(&got), "{:?} {:?}", dtype, isa);
            }
        }

        #[test]
        fn stacking_equals_packing_the_stacked_rows(
            kind in 0..KINDS.len(), ns in proptest::collection::vec(1usize..140, 1..4), seed: u64,
        ) {
            let dtype = KINDS[kind];
            let k = cols(dtype, 2).min(QK_K);
            // Every other case has whole panels but in the last part: stacked by concatenation.
            let last = ns.len() - 1;
            let ns: Vec<usize> = match seed % 2 {
                0 => ns
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| if i < last { n.div_ceil(PANEL) * PANEL } else { n })
                    .collect(),
                _ => ns,
            };
            let parts: Vec<(Vec<u8>, usize)> = ns
                .iter()
                .enumerate()
                .map(|(i, &n)| (quantized(dtype, n, k, seed ^ i as u64).0, n))
                .collect();
            let packed: Vec<BlockPacked> = parts
                .iter()
                .map(|(b, n)| BlockPacked::from_ggml(dtype, b, *n, k).unwrap())
                .collect();
            let stacked = BlockPacked::stack(&packed.iter().collect::<Vec<_>>()).unwrap();
            let all: Vec<u8> = parts.iter().flat_map(|(b, _)| b.clone()).collect();
            let whole = BlockPacked::from_ggml(dtype, &all, ns.iter().sum(), k).unwrap();
            prop_assert_eq!(stacked, whole);
        }
    }
}
