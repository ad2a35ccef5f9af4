//! Integer matrix multiplies over GGUF block-quantized weights: the draft model's kernels.
//!
//! This module owns [`IntPacked`] (a q4_0, q4_1, q5_0, q5_1 or q8_0 matrix repacked at load into
//! panels of the same quantized bits, or a q4_1 one with its block scales coded to 8 bits,
//! [`IntPacked::with_coded_scales`]; a q4_k / q5_k matrix is taken as q4_1 / q5_1 blocks of its
//! quants, each 32-value group's scale and minimum rounded to f16) and
//! [`matmul_int`] (activations quantized per 32-block to 8 bits, as GGUF does,
//! then integer dot products per block, combined in f32), and [`matmul_int_with`], which can give
//! the same kernels about 16-bit activations as two 8-bit rows ([`IntActivations`]).
//!
//! Every output is defined by `dot_portable`: per block, an exact integer sum, then one or two fused
//! multiply-adds into a single f32 accumulator, blocks in index order from zero. The SIMD paths keep
//! that order per output (lane = output row, tiles over independent outputs only), so every path
//! gives the same bits and an output does not depend on the batch size `m`. The integer sums are
//! exact, which is what lets the SIMD code reorder them freely.
//!
//! Paths are chosen at run time ([`Path::detect`]): AVX-512 VNNI (`vpdpbusd`, one 512-bit load
//! feeds a panel's sixteen rows), AVX2 (`maddubs + madd`), portable. Both SIMD paths form the same
//! exact integer sums, so the bits never depend on the CPU.
//!
//! Cost on one core of a 2-core AVX-512 Xeon VM (`AMUSD_BENCH_COPIES=100 AMUSD_BENCH_SHAPES=3072x576
//! taskset -c 1 cargo bench -p amusd-model --bench qkernels -- q4_1`, 100 copies of the gate/up so
//! nothing stays cached, at 02b9ba6): one row 11.6 GB/s with VNNI against 10.2 with AVX2 (the
//! probe in `benches/forward.rs` reads 11.5-13.4 GB/s on that VM: decoding is at the bandwidth);
//! 4 / 8 / 200 rows 1.4x / 1.5x / 1.5x faster with VNNI. On Zen 3 (AVX2 only) one row ran at
//! 13-30 GB/s of weights against 3-8 GB/s for candle's one-row path. AVX-512 tiles of eight rows
//! rather than four (commit d8c23c3; `AMUSD_BENCH_REPS=60 AMUSD_BENCH_STAT=min`, the two builds
//! alternating three times on the shared VM, best of each): q4_1 gate/up 8 rows 0.122 -> 0.104 ms,
//! 200 rows 3.20 -> 2.80; q4_1 down 0.084 -> 0.067, 1.99 -> 1.59; q4_0 gate/up 0.128 -> 0.118,
//! 3.08 -> 2.87; one and four rows unchanged (the same tile).

use candle_core::quantized::GgmlDType;
use half::f16;

use crate::ModelError;

/// Output rows per packed panel: two AVX2 vectors of eight 32-bit lanes, one lane per output row.
pub const ROWS: usize = 16;

/// Values per GGUF block (q4_0, q4_1, q5_0, q5_1, q8_0) and per quantized activation block.
const QK: usize = 32;

/// Most activation rows per tile in the SIMD kernels: each weight vector loaded (and, for q4, split
/// into nibbles) is used this many times. Each path's tile height is what its registers hold: four
/// rows' sums in AVX2's sixteen, eight in AVX-512's thirty-two (measured: 10-20% less time per
/// q4_1 row than four from 8 rows up; see the module doc).
const TILE: usize = 8;

/// The SIMD kernels' blocking of a batch: chunks of `CHUNK` activation rows (a multiple of
/// [`TILE`]) times groups of `GROUP` panels, tile by tile within them. A group's weights (at most
/// ~150 KB) stay in L2 while every tile of the chunk reads them, and each tile writes `GROUP * ROWS`
/// consecutive outputs per row. Panel by panel over a whole batch instead, a panel's outputs lie one
/// row of `y` apart, and for `n` a multiple of 1024 those rows share a few cache sets and evict each
/// other half-written: a 200-row batch through the 3072-row gate/up then ran ~1.5-3x slower per
/// output than through the 576-row `o`.
const CHUNK: usize = 32;
const GROUP: usize = 16;

/// The block types these kernels multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Q4_0,
    Q4_1,
    /// q4_0 / q4_1 with a fifth bit: each block's 32 high bits as one word before the nibbles.
    Q5_0,
    Q5_1,
    Q8_0,
    /// q4_1's nibbles with each block's scale and minimum as 8-bit codes against two f32 factors
    /// per row ([`coded`]): 18 bytes a block instead of 20.
    Q4_1S8,
}

impl Kind {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q5_1 => Some(Self::Q5_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q4_1S8 => "q4_1s8",
        }
    }

    /// Values that precede the quants in a block: the scale, and for q4_1 / q5_1 the minimum.
    fn scales(self) -> usize {
        match self.has_min() {
            true => 2,
            false => 1,
        }
    }

    /// Whether a block adds a minimum (`d * q + m`) rather than centring its quants.
    fn has_min(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q4_1S8 | Self::Q5_1)
    }

    /// The offset a kind without a minimum subtracts from its unsigned quants (q8_0's are signed).
    fn centre(self) -> i32 {
        match self {
            Self::Q4_0 => 8,
            Self::Q5_0 => 16,
            _ => 0,
        }
    }

    /// Whether the quants have a fifth bit, stored apart as a 32-bit word per block.
    fn five_bit(self) -> bool {
        matches!(self, Self::Q5_0 | Self::Q5_1)
    }

    /// Bytes of each of those values: an f16, or an 8-bit code.
    fn scale_width(self) -> usize {
        match self {
            Self::Q4_1S8 => 1,
            _ => 2,
        }
    }

    /// Bytes at the start of each panel: the coded kind's per-row factors, `ROWS` f32 for the
    /// scales then `ROWS` for the minimums.
    fn header_bytes(self) -> usize {
        match self {
            Self::Q4_1S8 => 2 * ROWS * 4,
            _ => 0,
        }
    }

    /// Bytes of quants in a block: nibbles for the q4 types, the high bits' word and then nibbles
    /// for the q5 ones.
    fn quant_bytes(self) -> usize {
        match self {
            Self::Q8_0 => QK,
            Self::Q5_0 | Self::Q5_1 => 4 + QK / 2,
            _ => QK / 2,
        }
    }

    /// Bytes of one block of one row: a stored GGUF block, or a coded one (two codes, then the
    /// quants).
    fn block_bytes(self) -> usize {
        self.scale_width() * self.scales() + self.quant_bytes()
    }
}

/// A GGUF block-quantized weight matrix `[n, k]` repacked at load for integer dot products.
///
/// Panels of [`ROWS`] consecutive rows; within a panel (after the coded kind's per-row factors),
/// block `b` of all its rows is stored together as `ROWS` f16 scales (or their codes), (q4_1)
/// `ROWS` f16 minimums (or their codes), then the quant bytes in groups of four:
/// bytes `4g..4g + 4` of row `r`'s block at `(g * ROWS + r) * 4`. A 32-bit lane thus holds four
/// consecutive quant bytes of one output row, so one vector load feeds eight rows. The bytes are the
/// stored ones (nibbles stay nibbles, as GGUF pairs them: low nibble of byte `j` is element `j`, high
/// is `j + 16`), reordered; a q5 block's first group is its high bits' word, its bits reordered
/// (`fifth_bits_word`). The last panel is padded with zero rows.
#[derive(Clone, Debug, PartialEq)]
pub struct IntPacked {
    kind: Kind,
    n: usize,
    k: usize,
    data: Vec<u8>,
    /// The blocks are the checkpoint's own, not converted (a k-quant taken as q4_1): their f32
    /// values are the verify model's ([`Self::widens_exactly`]).
    stored: bool,
}

impl IntPacked {
    /// Whether [`Self::from_ggml`] takes `dtype`: q4_0, q4_1, q5_0, q5_1, q8_0, and q4_k / q5_k
    /// as q4_1 / q5_1.
    pub fn supports(dtype: GgmlDType) -> bool {
        Kind::of(dtype).is_some() || matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K)
    }

    /// `bytes`: the tensor's raw GGUF blocks, row-major (as candle's `QTensor::data()` returns).
    pub fn from_ggml(
        dtype: GgmlDType,
        bytes: &[u8],
        n: usize,
        k: usize,
    ) -> Result<Self, ModelError> {
        if let Some((five, as_type)) = match dtype {
            GgmlDType::Q4K => Some((false, GgmlDType::Q4_1)),
            GgmlDType::Q5K => Some((true, GgmlDType::Q5_1)),
            _ => None,
        } {
            // A q4_k / q5_k group is a q4_1 / q5_1 block with f32 scales: the same quants, scales
            // in f16.
            crate::gguf::check_block_matrix(dtype, bytes.len(), n, k, 256, dtype.type_size())?;
            let blocks = crate::qexact::k_quant_as_q_1(five, bytes);
            let converted = Self::from_ggml(as_type, &blocks, n, k)?;
            return Ok(Self {
                stored: false,
                ..converted
            });
        }
        let kind = Kind::of(dtype).ok_or_else(|| {
            ModelError::Unsupported(format!("no integer kernel for {dtype:?} weights"))
        })?;
        let bb = kind.block_bytes();
        crate::gguf::check_block_matrix(dtype, bytes.len(), n, k, QK, bb)?;
        Self::from_block_rows(kind, n, k, bytes.chunks_exact(k / QK * bb))
    }

    /// [`Self::from_ggml`] of a q8_0 matrix given row by row (each row's GGUF blocks), so that
    /// no copy of the whole matrix is made on the way.
    pub(crate) fn from_q8_0_rows(
        n: usize,
        k: usize,
        rows: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<Self, ModelError> {
        Self::from_block_rows(Kind::Q8_0, n, k, rows)
    }

    /// The `n` rows of `kind` blocks `rows` (each a row's GGUF bytes), packed.
    fn from_block_rows(
        kind: Kind,
        n: usize,
        k: usize,
        rows: impl IntoIterator<Item = impl AsRef<[u8]>>,
    ) -> Result<Self, ModelError> {
        let bb = kind.block_bytes();
        let mut w = Self::zeroed(kind, n, k);
        let mut count = 0;
        for (j, row) in rows.into_iter().enumerate() {
            let row = row.as_ref();
            if j >= n || !k.is_multiple_of(QK) || row.len() != k / QK * bb {
                return Err(ModelError::Shape(format!(
                    "{} row {j} of {} bytes for a {n}x{k} matrix",
                    kind.name(),
                    row.len()
                )));
            }
            for (b, block) in row.chunks_exact(bb).enumerate() {
                w.put_block(j, b, block);
            }
            count += 1;
        }
        if count != n {
            return Err(ModelError::Shape(format!(
                "{count} {} rows for {n}",
                kind.name()
            )));
        }
        Ok(w)
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// The storage's name: the GGUF type, or `q4_1s8` for q4_1 with coded scales.
    pub fn type_name(&self) -> &'static str {
        self.kind.name()
    }

    /// A matrix of zero rows (zero blocks, zero factors).
    fn zeroed(kind: Kind, n: usize, k: usize) -> Self {
        let panel = kind.header_bytes() + k / QK * ROWS * kind.block_bytes();
        Self {
            kind,
            n,
            k,
            data: vec![0; n.div_ceil(ROWS) * panel],
            stored: true,
        }
    }

    /// Resident size in bytes: the stored size plus the zero rows that pad the last panel.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Where the weights lie: start address and bytes.
    pub fn span(&self) -> (usize, usize) {
        (self.data.as_ptr() as usize, self.data.len())
    }

    /// The matrix of rows `ids`, in that order (each below [`Self::rows`]): the same blocks.
    pub fn select_rows(&self, ids: &[u32]) -> Self {
        let mut out = Self::zeroed(self.kind, ids.len(), self.k);
        for (to, &j) in ids.iter().enumerate() {
            out.copy_row(to, self, j as usize);
        }
        out.stored = self.stored;
        out
    }

    /// Row `j` of `src` (same kind and width) as this matrix's row `to`: its blocks as they are
    /// packed, and its factors.
    fn copy_row(&mut self, to: usize, src: &Self, j: usize) {
        // The largest block: q8_0's scale and 32 quants.
        let mut buf = [0u8; 2 + QK];
        let block = &mut buf[..self.kind.block_bytes()];
        for b in 0..self.k / QK {
            src.get_block(j, b, block);
            self.put_block(to, b, block);
        }
        if let Some(f) = src.factors(j) {
            self.set_factors(to, f);
        }
    }

    /// Row `j` dequantized to f32 exactly as candle's `to_float` does (for embedding lookups).
    pub fn row_into(&self, j: usize, dst: &mut [f32]) {
        let mut block = vec![0u8; self.kind.block_bytes()];
        for (b, out) in dst[..self.k].chunks_exact_mut(QK).enumerate() {
            self.get_block(j, b, &mut block);
            let s = self.kind.scale_width() * self.kind.scales();
            let (d, m) = self.block_scales(j, &block);
            let qs = &block[s..];
            match self.kind {
                Kind::Q8_0 => {
                    for (o, &q) in out.iter_mut().zip(qs) {
                        *o = q as i8 as f32 * d;
                    }
                }
                kind => {
                    // candle's: `q as f32 * d + m`, or `(q - centre) as f32 * d`.
                    let value = |q: i32| match kind.has_min() {
                        true => q as f32 * d + m,
                        false => (q - kind.centre()) as f32 * d,
                    };
                    for i in 0..QK / 2 {
                        let (lo, hi) = quant_pair(kind, qs, i);
                        (out[i], out[i + QK / 2]) = (value(lo), value(hi));
                    }
                }
            }
        }
    }

    /// Row `j`'s block as [`Self::get_block`] gives it: its scale and minimum (0 where the kind
    /// has none) as every kernel computes them, [`dot_portable`]'s definition.
    fn block_scales(&self, j: usize, block: &[u8]) -> (f32, f32) {
        let f16_at = |o: usize| f16::from_le_bytes([block[o], block[o + 1]]).to_f32();
        match self.kind {
            Kind::Q4_0 | Kind::Q5_0 | Kind::Q8_0 => (f16_at(0), 0.0),
            Kind::Q4_1 | Kind::Q5_1 => (f16_at(0), f16_at(2)),
            Kind::Q4_1S8 => {
                let (fd, fm) = self.factors(j).expect("a coded row has factors");
                coded::scales(fd, fm, block[0], block[1])
            }
        }
    }

    /// Row `j`'s factors of the coded kind (scale, minimum); `None` for the GGUF kinds.
    fn factors(&self, j: usize) -> Option<(f32, f32)> {
        if self.kind.header_bytes() == 0 {
            return None;
        }
        let (base, r) = (j / ROWS * self.panel_len(), j % ROWS);
        let f = |o: usize| f32::from_le_bytes(self.data[o..o + 4].try_into().unwrap());
        Some((f(base + 4 * r), f(base + 4 * (ROWS + r))))
    }

    fn set_factors(&mut self, j: usize, (fd, fm): (f32, f32)) {
        let (base, r) = (j / ROWS * self.panel_len(), j % ROWS);
        self.data[base + 4 * r..][..4].copy_from_slice(&fd.to_le_bytes());
        self.data[base + 4 * (ROWS + r)..][..4].copy_from_slice(&fm.to_le_bytes());
    }

    /// The stored GGUF blocks back in row-major order (the coded kind: its codes and quants).
    #[cfg(test)]
    fn to_ggml(&self) -> Vec<u8> {
        let bb = self.kind.block_bytes();
        let nb = self.k / QK;
        let mut out = vec![0u8; self.n * nb * bb];
        for (j, out) in out.chunks_exact_mut(nb * bb).enumerate() {
            for (b, block) in out.chunks_exact_mut(bb).enumerate() {
                self.get_block(j, b, block);
            }
        }
        out
    }

    /// Rows of `parts` stacked (fusing Q/K/V and gate/up); same dtype and k. Each output of the
    /// stacked matrix is computed exactly as in its own part.
    pub fn stack(parts: &[&Self]) -> Result<Self, ModelError> {
        let first = parts
            .first()
            .ok_or_else(|| ModelError::Shape("stacking no matrices".into()))?;
        if parts.iter().any(|p| p.kind != first.kind || p.k != first.k) {
            return Err(ModelError::Shape(
                "cannot stack matrices of different types or widths".into(),
            ));
        }
        let n = parts.iter().map(|p| p.n).sum();
        let stored = parts.iter().all(|p| p.stored);
        let panels: Vec<_> = parts.iter().map(|p| (p.n, p.data.as_slice())).collect();
        if let Some(data) = crate::kernels::whole_panels(&panels, ROWS) {
            return Ok(Self {
                kind: first.kind,
                n,
                k: first.k,
                data,
                stored,
            });
        }
        // Otherwise row by row.
        let mut out = Self::zeroed(first.kind, n, first.k);
        let rows = parts.iter().flat_map(|p| (0..p.n).map(move |j| (*p, j)));
        for (to, (p, j)) in rows.enumerate() {
            out.copy_row(to, p, j);
        }
        out.stored = stored;
        Ok(out)
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(ROWS)
    }

    /// Bytes of block `b` of a whole panel (all its rows).
    fn panel_block_bytes(&self) -> usize {
        ROWS * self.kind.block_bytes()
    }

    /// Bytes of a panel: its header, then its blocks.
    fn panel_len(&self) -> usize {
        self.kind.header_bytes() + self.k / QK * self.panel_block_bytes()
    }

    /// Panel `p`: its header, then its blocks in order, [`Self::panel_block_bytes`] each.
    fn panel(&self, p: usize) -> &[u8] {
        let len = self.panel_len();
        &self.data[p * len..(p + 1) * len]
    }

    /// Offsets in `data` of row `j`, block `b`: its scales and its quant bytes (first group).
    fn offsets(&self, j: usize, b: usize) -> (usize, usize) {
        let (p, r, width) = (j / ROWS, j % ROWS, self.kind.scale_width());
        let base = p * self.panel_len() + self.kind.header_bytes() + b * self.panel_block_bytes();
        (
            base + width * r,
            base + width * ROWS * self.kind.scales() + 4 * r,
        )
    }

    fn put_block(&mut self, j: usize, b: usize, block: &[u8]) {
        let (scales, quants) = self.offsets(j, b);
        let w = self.kind.scale_width();
        for s in 0..self.kind.scales() {
            self.data[scales + w * ROWS * s..][..w].copy_from_slice(&block[w * s..w * (s + 1)]);
        }
        let qs = &block[w * self.kind.scales()..];
        for (g, four) in qs.chunks_exact(4).enumerate() {
            let four: [u8; 4] = four.try_into().unwrap();
            let four = match self.kind.five_bit() && g == 0 {
                true => fifth_bits_word(four, false),
                false => four,
            };
            self.data[quants + 4 * ROWS * g..][..4].copy_from_slice(&four);
        }
    }

    fn get_block(&self, j: usize, b: usize, block: &mut [u8]) {
        let (scales, quants) = self.offsets(j, b);
        let w = self.kind.scale_width();
        for s in 0..self.kind.scales() {
            block[w * s..w * (s + 1)].copy_from_slice(&self.data[scales + w * ROWS * s..][..w]);
        }
        let qs = &mut block[w * self.kind.scales()..];
        for (g, four) in qs.chunks_exact_mut(4).enumerate() {
            let packed: [u8; 4] = self.data[quants + 4 * ROWS * g..][..4].try_into().unwrap();
            four.copy_from_slice(&match self.kind.five_bit() && g == 0 {
                true => fifth_bits_word(packed, true),
                false => packed,
            });
        }
    }
}

/// A q5 block's high-bit word (bit `e` = element `e`'s fifth bit, as GGUF stores it) as the
/// panels keep it (`back`: the other way): bit `g` of byte `i` is element `4g + i`'s, bit `4 + g`
/// element `16 + 4g + i`'s. Group `g` of a panel's quants (its elements `4g..4g + 4` and
/// `16 + 4g..16 + 4g + 4`) then finds each of its elements' fifth bits in that element's byte at
/// one position, which the kernels move into place with a mask and a shift.
fn fifth_bits_word(word: [u8; 4], back: bool) -> [u8; 4] {
    let word = u32::from_le_bytes(word);
    // Element e = 16h + 4g + i sits at bit e of the stored word, bit 8i + 4h + g of the packed.
    let packed_bit = |e: u32| 8 * (e % 4) + 4 * (e / 16) + e / 4 % 4;
    let mut out = 0u32;
    for e in 0..32 {
        let (from, to) = match back {
            false => (e, packed_bit(e)),
            true => (packed_bit(e), e),
        };
        out |= (word >> from & 1) << to;
    }
    out.to_le_bytes()
}

/// Activation rows quantized per 32-block to 8 bits, q8_0 style, with what each block type needs.
struct QuantActs {
    nb: usize,
    /// `m * k` quants.
    q: Vec<i8>,
    /// Per block: the scale `max|x| / 127`.
    d: Vec<f32>,
    /// Per block: the sum of the quants.
    s: Vec<i32>,
    /// Per block: `d * s`, the block's sum as the quants represent it (q4_1's minimum term).
    ds: Vec<f32>,
}

/// `max(0, |x|...)`, NaNs ignored (as `f32::max` ignores them). Eight running maxima, not one
/// chain: max is exact, so the grouping cannot change the result, and the compiler vectorises it.
pub(crate) fn abs_max(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l = l.max(v.abs());
        }
    }
    let tail = chunks.remainder().iter().fold(0f32, |a, v| a.max(v.abs()));
    lanes.iter().fold(tail, |a, &v| a.max(v))
}

impl QuantActs {
    /// The quantized activations are part of the result's definition: [`Self::quantize_block`]
    /// defines them, and the AVX-512 or AVX2 quantizer (where the CPU has it; tested bit for bit)
    /// computes the same. Rounds half to even, as ggml's AVX quantizer does.
    fn new(x: &[f32], m: usize, k: usize) -> Self {
        let nb = k / QK;
        let mut a = Self {
            nb,
            q: vec![0; m * k],
            d: vec![0.0; m * nb],
            s: vec![0; m * nb],
            ds: vec![0.0; m * nb],
        };
        #[cfg(target_arch = "x86_64")]
        if Path::Avx512Vnni.available() {
            // SAFETY: the CPU has AVX512F and AVX512BW (checked); `a` holds `m * nb` blocks.
            unsafe { avx512::quantize(&x[..m * k], &mut a) };
            return a;
        }
        #[cfg(target_arch = "x86_64")]
        if Path::Avx2.available() {
            // SAFETY: the CPU has AVX2 (checked); `a` holds `m * nb` blocks.
            unsafe { avx2::quantize(&x[..m * k], &mut a) };
            return a;
        }
        let blocks = x[..m * k].chunks_exact(QK).zip(a.q.chunks_exact_mut(QK));
        for (i, (xs, qs)) in blocks.enumerate() {
            (a.d[i], a.s[i], a.ds[i]) = Self::quantize_block(xs, qs);
        }
        a
    }

    /// One block: its quants into `qs`, and its scale, quant sum and `scale * sum`.
    fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, i32, f32) {
        let amax = abs_max(xs);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut s = 0i32;
        for (q, v) in qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
            s += *q as i32;
        }
        (d, s, d * s as f32)
    }

    fn row(&self, i: usize) -> &[i8] {
        &self.q[i * self.nb * QK..(i + 1) * self.nb * QK]
    }
}

/// A kernel implementation; all give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Portable,
    /// `vpmaddubsw` + `vpmaddwd` on 256-bit vectors (needs AVX2, FMA, F16C).
    Avx2,
    /// `vpdpbusd` on 512-bit vectors (needs AVX512F, AVX512BW, AVX512-VNNI).
    Avx512Vnni,
}

impl Path {
    /// Every path, slowest first.
    pub const ALL: [Self; 3] = [Self::Portable, Self::Avx2, Self::Avx512Vnni];

    /// The fastest path this CPU runs.
    pub fn detect() -> Self {
        Self::ALL
            .into_iter()
            .rev()
            .find(|p| p.available())
            .unwrap_or(Self::Portable)
    }

    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Self::Portable => true,
                Self::Avx2 => {
                    is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                }
                Self::Avx512Vnni => {
                    Self::Avx2.available()
                        && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Self::Portable
        }
    }
}

/// `y[m, n] = x[m, k] W^T`: activations quantized per 32-block to 8 bits (scale `max|x|/127`,
/// rounded to nearest), integer dot products per block, block results combined in f32 in block
/// order, on the fastest path this CPU has.
pub fn matmul_int(x: &[f32], m: usize, w: &IntPacked, y: &mut [f32]) {
    matmul_int_on(Path::detect(), x, m, w, y)
}

/// [`matmul_int`] on a given path.
///
/// # Panics
/// If the CPU lacks `path` or a buffer is too short.
pub fn matmul_int_on(path: Path, x: &[f32], m: usize, w: &IntPacked, y: &mut [f32]) {
    check_call(path, x, m, w, y);
    run(path, &QuantActs::new(x, m, w.k), m, w, y);
}

/// The `# Panics` of every public product: buffers too short, or a path this CPU lacks.
fn check_call(path: Path, x: &[f32], m: usize, w: &IntPacked, y: &[f32]) {
    assert!(
        x.len() >= m * w.k && y.len() >= m * w.n,
        "matmul_int buffers"
    );
    assert!(
        path.available(),
        "{path:?} kernels need a CPU that has them"
    );
}

/// The kernels over activations quantized already (`m` rows).
fn run(path: Path, acts: &QuantActs, m: usize, w: &IntPacked, y: &mut [f32]) {
    match path {
        Path::Portable => matmul_portable(acts, m, w, y),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available` checked that the CPU has AVX2, FMA and F16C.
        Path::Avx2 => unsafe { avx2::matmul(acts, m, w, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available` checked that the CPU has AVX512F, AVX512BW and AVX512-VNNI.
        Path::Avx512Vnni => unsafe { avx512::matmul(acts, m, w, y) },
        #[cfg(not(target_arch = "x86_64"))]
        Path::Avx2 | Path::Avx512Vnni => unreachable!("not available"),
    }
}

fn matmul_portable(a: &QuantActs, m: usize, w: &IntPacked, y: &mut [f32]) {
    let n = w.n;
    for p in 0..w.panels() {
        let panel = w.panel(p);
        let count = (n - p * ROWS).min(ROWS);
        for i in 0..m {
            for r in 0..count {
                y[i * n + p * ROWS + r] = dot_portable(w, panel, r, a, i);
            }
        }
    }
}

/// Output row `r` of `panel` times activation row `i`: the definition every path computes.
fn dot_portable(w: &IntPacked, panel: &[u8], r: usize, a: &QuantActs, i: usize) -> f32 {
    let kind = w.kind;
    let qx = a.row(i);
    let f16_at = |bytes: &[u8], o: usize| f16::from_le_bytes([bytes[o], bytes[o + 1]]).to_f32();
    let f32_at = |o: usize| f32::from_le_bytes(panel[o..o + 4].try_into().unwrap());
    let blocks = &panel[kind.header_bytes()..];
    let mut acc = 0f32;
    for (b, blk) in blocks.chunks_exact(w.panel_block_bytes()).enumerate() {
        let qs = &blk[kind.scale_width() * ROWS * kind.scales()..];
        let x = &qx[b * QK..(b + 1) * QK];
        // Row `r`'s block as GGUF stores it: the quant bytes are in groups of four, `ROWS` apart.
        let mut block = [0u8; QK];
        for (g, four) in block[..kind.quant_bytes()].chunks_exact_mut(4).enumerate() {
            four.copy_from_slice(&qs[(g * ROWS + r) * 4..][..4]);
        }
        if kind.five_bit() {
            let packed = block[..4].try_into().unwrap();
            block[..4].copy_from_slice(&fifth_bits_word(packed, true));
        }
        let isum: i32 = match kind {
            Kind::Q8_0 => (block.iter().zip(x))
                .map(|(&q, &x)| q as i8 as i32 * x as i32)
                .sum(),
            _ => (0..QK / 2)
                .map(|p| {
                    let (lo, hi) = quant_pair(kind, &block, p);
                    lo * x[p] as i32 + hi * x[p + QK / 2] as i32
                })
                .sum(),
        };
        let ab = i * a.nb + b;
        let isum = isum - kind.centre() * a.s[ab];
        let (dw, mw) = match kind {
            Kind::Q4_1S8 => {
                let factors = (f32_at(4 * r), f32_at(4 * (ROWS + r)));
                coded::scales(factors.0, factors.1, blk[r], blk[ROWS + r])
            }
            Kind::Q4_1 | Kind::Q5_1 => (f16_at(blk, 2 * r), f16_at(blk, 2 * (ROWS + r))),
            Kind::Q4_0 | Kind::Q5_0 | Kind::Q8_0 => (f16_at(blk, 2 * r), 0.0),
        };
        acc = (isum as f32).mul_add(dw * a.d[ab], acc);
        if kind.has_min() {
            acc = mw.mul_add(a.ds[ab], acc);
        }
    }
    acc
}

/// Elements `p` and `p + 16` (`p < 16`) of a q4 / q5 block's quants as GGUF stores them (`qs`:
/// q5's high bits' word, then the nibbles), unsigned: 0..15, or 0..31 with the fifth bit.
fn quant_pair(kind: Kind, qs: &[u8], p: usize) -> (i32, i32) {
    let (high, nibbles) = match kind.five_bit() {
        true => (u32::from_le_bytes(qs[..4].try_into().unwrap()), &qs[4..]),
        false => (0, qs),
    };
    let fifth = |e: usize| ((high >> e & 1) << 4) as i32;
    let q = nibbles[p];
    (
        (q & 0x0F) as i32 | fifth(p),
        (q >> 4) as i32 | fifth(p + QK / 2),
    )
}

/// Where a tile's kernel stores its rows' outputs: row `t`'s [`ROWS`] values at `at + t * stride`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct OutRows {
    at: *mut f32,
    stride: usize,
}

/// A SIMD path's kernel for one tile: activation rows `i0..i0 + t` (`t` at most the path's tile
/// height, itself at most [`TILE`]) times the panel at `panel` into `out`'s first `t` rows.
#[cfg(target_arch = "x86_64")]
type TileKernel = unsafe fn(&IntPacked, *const u8, &QuantActs, usize, usize, OutRows);

/// The SIMD paths' walk over a batch ([`CHUNK`] and [`GROUP`] say why this order): `kernel` for
/// every tile of `height` rows (the last may be shorter) and panel. A whole panel's outputs go
/// straight into `y`; the last, partial one's through a buffer.
///
/// # Safety
/// The CPU must run `kernel`, which must take tiles of up to `height` rows; `a` must hold `m` rows
/// of `w.cols()` values and `y` `m * w.rows()` outputs.
#[cfg(target_arch = "x86_64")]
unsafe fn tiled(
    a: &QuantActs,
    m: usize,
    w: &IntPacked,
    y: &mut [f32],
    kernel: TileKernel,
    height: usize,
) {
    assert!((1..=TILE).contains(&height) && CHUNK.is_multiple_of(height));
    assert!(y.len() >= m * w.n, "matmul_int output");
    let (n, panels) = (w.n, w.panels());
    let mut partial = [[0f32; ROWS]; TILE];
    for c0 in (0..m).step_by(CHUNK) {
        let chunk = c0..(c0 + CHUNK).min(m);
        for g0 in (0..panels).step_by(GROUP) {
            for i0 in chunk.clone().step_by(height) {
                let t = (chunk.end - i0).min(height);
                for p in g0..(g0 + GROUP).min(panels) {
                    let count = (n - p * ROWS).min(ROWS);
                    let panel = w.panel(p).as_ptr();
                    if count == ROWS {
                        let at = y.as_mut_ptr().add(i0 * n + p * ROWS);
                        kernel(w, panel, a, i0, t, OutRows { at, stride: n });
                        continue;
                    }
                    let at = partial.as_mut_ptr().cast::<f32>();
                    kernel(w, panel, a, i0, t, OutRows { at, stride: ROWS });
                    for (di, o) in partial.iter().take(t).enumerate() {
                        let row = (i0 + di) * n + p * ROWS;
                        y[row..row + count].copy_from_slice(&o[..count]);
                    }
                }
            }
        }
    }
}

/// How far ahead of the bytes being multiplied the SIMD kernels prefetch. Panels lie one after the
/// other, so this runs into the next panel, which is read next.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 4096;

/// Prefetches the cache line `PREFETCH_BYTES` past `p`, into L1, or with `l2` into L2. A prefetch
/// never faults, so running past the matrix's end is harmless; `wrapping_add` keeps the pointer
/// arithmetic defined. Only q8_0 panels over several rows (the verify model's screened head)
/// prefetch into L2: its eight-row forward 21.5-21.6 -> 20.9-21.1 ms (`EXACT=1 SPEC=f32 CTX=200
/// ROWS=8 TEXT=... fwd_probe`, three alternating rounds, Zen 4); with every panel's prefetch
/// into L2 the draft's one-row forward went 3.4 -> 4.1 ms.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(p: *const u8, l2: bool) {
    let p = p.wrapping_add(PREFETCH_BYTES);
    match l2 {
        true => crate::kernels::prefetch_range_l2(p, 1),
        false => crate::kernels::prefetch_range(p, 1),
    }
}

/// The activation rows of one tile: where their quants and per-block values start.
#[cfg(target_arch = "x86_64")]
struct Tile<const T: usize> {
    q: [*const i8; T],
    d: [*const f32; T],
    s: [*const i32; T],
    ds: [*const f32; T],
}

#[cfg(target_arch = "x86_64")]
impl<const T: usize> Tile<T> {
    /// Rows `i0..i0 + T` of `a` (the caller keeps them in bounds before reading through them).
    fn new(a: &QuantActs, i0: usize) -> Self {
        let nb = a.nb;
        Self {
            q: std::array::from_fn(|t| a.q.as_ptr().wrapping_add((i0 + t) * nb * QK)),
            d: std::array::from_fn(|t| a.d.as_ptr().wrapping_add((i0 + t) * nb)),
            s: std::array::from_fn(|t| a.s.as_ptr().wrapping_add((i0 + t) * nb)),
            ds: std::array::from_fn(|t| a.ds.as_ptr().wrapping_add((i0 + t) * nb)),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod coded;
mod exact;
mod residual;

pub(crate) use residual::{matmul_int_residual, quantization_norms};
pub use residual::{matmul_int_with, matmul_int_with_on, IntActivations};

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The GGUF types the kernels multiply (q4_k and q5_k run as q4_1 and q5_1).
    pub(super) const DTYPES: [GgmlDType; 5] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ];

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn q8_0_rows_pack_as_the_whole_matrix() {
        let (n, k) = (37, 96);
        let (bytes, _) = crate::testing::quantized_matrix(GgmlDType::Q8_0, n, k, 3);
        let rows = bytes.chunks_exact(bytes.len() / n).map(<[u8]>::to_vec);
        let whole = IntPacked::from_ggml(GgmlDType::Q8_0, &bytes, n, k).unwrap();
        assert_eq!(
            IntPacked::from_q8_0_rows(n, k, rows.clone()).unwrap(),
            whole
        );
        assert!(IntPacked::from_q8_0_rows(n + 1, k, rows.clone()).is_err());
        assert!(IntPacked::from_q8_0_rows(n - 1, k, rows).is_err());
    }

    use crate::testing::quantized_matrix as quantized;

    /// The kinds under test: [`DTYPES`], then q4_1 with coded scales.
    const KINDS: usize = DTYPES.len() + 1;

    fn kind_name(kind: usize) -> &'static str {
        DTYPES
            .get(kind)
            .map_or("q4_1s8", |d| Kind::of(*d).unwrap().name())
    }

    /// GGUF blocks of kind `kind`'s source type (q4_1 for the coded kind), and the matrix of kind
    /// `kind` packed from them.
    fn source(kind: usize, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        quantized(*DTYPES.get(kind).unwrap_or(&GgmlDType::Q4_1), n, k, seed)
    }

    fn pack(kind: usize, bytes: &[u8], n: usize, k: usize) -> IntPacked {
        let w = IntPacked::from_ggml(*DTYPES.get(kind).unwrap_or(&GgmlDType::Q4_1), bytes, n, k);
        match kind < DTYPES.len() {
            true => w.unwrap(),
            false => w.unwrap().with_coded_scales().unwrap(),
        }
    }

    /// A random `[n, k]` matrix of kind `kind` and its weights as f32.
    fn packed(kind: usize, n: usize, k: usize, seed: u64) -> (IntPacked, Vec<f32>) {
        let (bytes, dense) = source(kind, n, k, seed);
        let w = pack(kind, &bytes, n, k);
        if kind < DTYPES.len() {
            return (w, dense);
        }
        let mut dense = vec![0f32; n * k];
        for (j, row) in dense.chunks_exact_mut(k).enumerate() {
            w.row_into(j, row);
        }
        (w, dense)
    }

    fn product(path: Path, x: &[f32], m: usize, w: &IntPacked) -> Vec<f32> {
        let mut y = vec![f32::NAN; m * w.rows()];
        matmul_int_on(path, x, m, w, &mut y);
        y
    }

    fn paths() -> Vec<Path> {
        Path::ALL.into_iter().filter(|p| p.available()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The SIMD quantizer this CPU runs gives the definition's quants, scales and sums,
        /// whatever the values (NaN, infinities, signed zeros, subnormals, wide ranges).
        #[test]
        fn the_quantizer_has_the_definitions_bits(
            xs in proptest::collection::vec(
                prop_oneof![
                    4 => -3.0f32..3.0,
                    1 => any::<f32>(),
                    1 => Just(f32::NAN),
                    1 => Just(-0.0f32),
                    1 => Just(f32::INFINITY),
                    1 => Just(1e-40f32),
                ],
                QK..8 * QK,
            ),
        ) {
            let k = xs.len() / QK * QK;
            let got = QuantActs::new(&xs[..k], 1, k);
            for (b, block) in xs[..k].chunks_exact(QK).enumerate() {
                let mut qs = [0i8; QK];
                let (d, s, ds) = QuantActs::quantize_block(block, &mut qs);
                prop_assert_eq!(&got.q[b * QK..(b + 1) * QK], &qs[..]);
                prop_assert_eq!((got.d[b].to_bits(), got.s[b]), (d.to_bits(), s));
                prop_assert_eq!(got.ds[b].to_bits(), ds.to_bits());
            }
        }

        /// The lane-parallel maximum is the one-chain fold's, bit for bit, NaNs and signed zeros
        /// included.
        #[test]
        fn abs_max_is_the_folded_maximum(
            xs in proptest::collection::vec(
                prop_oneof![any::<f32>(), Just(f32::NAN), Just(-0.0f32), Just(0.0f32)], 0..70,
            ),
        ) {
            let folded = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            prop_assert_eq!(abs_max(&xs).to_bits(), folded.to_bits());
        }

        /// Every path equals the portable one bit for bit, and every row of a batch equals that
        /// row multiplied alone.
        #[test]
        fn paths_agree_and_batches_are_invariant(
            d in 0..KINDS, n in 1..70usize, blocks in 1..7usize, m in 1..=40usize, seed: u64,
        ) {
            let (dtype, k) = (kind_name(d), blocks * QK);
            let (w, _) = packed(d, n, k, seed);
            let x: Vec<f32> = random(m * k, seed ^ 1).iter().map(|v| v * 3.0).collect();
            let want = product(Path::Portable, &x, m, &w);
            for path in paths() {
                let got = product(path, &x, m, &w);
                prop_assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{:?} {:?}", path, dtype
                );
                for i in 0..m {
                    let alone = product(path, &x[i * k..(i + 1) * k], 1, &w);
                    prop_assert_eq!(&alone[..], &got[i * n..(i + 1) * n], "{:?} {:?} row {}", path, dtype, i);
                }
            }
        }
    }

    /// Blocks that reach the conversion's edges: a subnormal maximum (its reciprocal overflows,
    /// so every product is infinite or NaN, which `as i8` saturates or zeroes), infinities, NaNs.
    #[test]
    fn the_quantizer_saturates_as_the_definition_does() {
        let tiny = 1e-40f32;
        let blocks: [[f32; QK]; 5] = [
            [tiny; QK],
            std::array::from_fn(|i| [tiny, -tiny, 0.0, -0.0][i % 4]),
            std::array::from_fn(|i| [f32::INFINITY, 1.0, f32::NEG_INFINITY, f32::NAN][i % 4]),
            [f32::NAN; QK],
            std::array::from_fn(|i| (i as f32 - 15.5) * 1e30),
        ];
        let x: Vec<f32> = blocks.iter().flatten().copied().collect();
        let got = QuantActs::new(&x, 1, x.len());
        for (b, block) in blocks.iter().enumerate() {
            let mut qs = [0i8; QK];
            let (d, s, ds) = QuantActs::quantize_block(block, &mut qs);
            assert_eq!(&got.q[b * QK..(b + 1) * QK], &qs[..], "block {b}");
            assert_eq!(
                (got.d[b].to_bits(), got.s[b], got.ds[b].to_bits()),
                (d.to_bits(), s, ds.to_bits())
            );
        }
        assert_eq!(got.q[0], 127, "a subnormal maximum's quants saturate");
    }

    #[test]
    fn products_are_close_to_the_dequantized_f32_product() {
        let (n, k, m) = (37, 256, 5);
        for kind in 0..KINDS {
            let (w, dense) = packed(kind, n, k, 7);
            let dtype = kind_name(kind);
            let x = random(m * k, 8);
            for path in paths() {
                let y = product(path, &x, m, &w);
                for i in 0..m {
                    for j in 0..n {
                        let (xi, wj) = (&x[i * k..(i + 1) * k], &dense[j * k..(j + 1) * k]);
                        let exact: f64 =
                            xi.iter().zip(wj).map(|(a, b)| *a as f64 * *b as f64).sum();
                        // Rounding x to 8 bits moves each value by at most half a step of its
                        // block's scale; the f32 arithmetic adds a little on top.
                        let mut bound = 0f64;
                        for (xb, wb) in xi.chunks(QK).zip(wj.chunks(QK)) {
                            let step = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                            let mass: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                            bound += 0.5 * step * mass;
                        }
                        let mass: f64 = xi.iter().zip(wj).map(|(a, b)| (a * b).abs() as f64).sum();
                        bound += 1e-5 * mass;
                        let err = (y[i * n + j] as f64 - exact).abs();
                        assert!(
                            err <= bound,
                            "{path:?} {dtype} y[{i},{j}] = {} vs {exact}: error {err} > {bound}",
                            y[i * n + j]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_dequantize_exactly_as_candle_does() {
        let (n, k) = (21, 96);
        for dtype in DTYPES {
            let (bytes, dense) = quantized(dtype, n, k, 3);
            let w = IntPacked::from_ggml(dtype, &bytes, n, k).unwrap();
            assert_eq!(w.to_ggml(), bytes, "{dtype:?}");
            assert_eq!(
                w.bytes(),
                ROWS * 2 * k / QK * dtype.type_size(),
                "{dtype:?}"
            );
            let mut row = vec![0f32; k];
            for j in 0..n {
                w.row_into(j, &mut row);
                assert_eq!(
                    row.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    dense[j * k..(j + 1) * k]
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "{dtype:?} row {j}"
                );
            }
        }
    }

    #[test]
    fn stacking_equals_packing_the_stacked_rows() {
        let k = 64;
        // Repacked rows, and whole panels but in the last part (concatenated).
        let shapes = [[(5, 1), (16, 2), (23, 3)], [(16, 1), (32, 2), (7, 3)]];
        for (kind, shape) in (0..KINDS).flat_map(|d| shapes.map(|s| (d, s))) {
            let dtype = kind_name(kind);
            let parts: Vec<(Vec<u8>, usize)> = shape
                .into_iter()
                .map(|(n, seed)| (source(kind, n, k, seed).0, n))
                .collect();
            let total = parts.iter().map(|(_, n)| n).sum();
            let packed: Vec<IntPacked> = parts.iter().map(|(b, n)| pack(kind, b, *n, k)).collect();
            let stacked = IntPacked::stack(&packed.iter().collect::<Vec<_>>()).unwrap();
            let all: Vec<u8> = parts.iter().flat_map(|(b, _)| b.clone()).collect();
            assert_eq!(stacked, pack(kind, &all, total, k), "{dtype}");
            // Stacked, each part's rows are its own: the same blocks, codes and factors.
            let ids: Vec<u32> = (0..total as u32).collect();
            assert_eq!(stacked.select_rows(&ids), stacked, "{dtype}");
            let mut off = 0;
            for p in &packed {
                let rows: Vec<u32> = (off as u32..(off + p.rows()) as u32).collect();
                assert_eq!(&stacked.select_rows(&rows), p, "{dtype}");
                off += p.rows();
            }
            let x = random(3 * k, 4);
            let y = product(Path::detect(), &x, 3, &stacked);
            let mut off = 0;
            for p in &packed {
                let yp = product(Path::detect(), &x, 3, p);
                for i in 0..3 {
                    let got = &y[i * total + off..i * total + off + p.rows()];
                    assert_eq!(got, &yp[i * p.rows()..(i + 1) * p.rows()], "{dtype}");
                }
                off += p.rows();
            }
        }
    }

    /// A q4_k (q5_k) matrix is its quants as q4_1 (q5_1) blocks, each group's scale and minimum
    /// rounded to f16: every weight within that rounding of candle's value, at q4_1's (q5_1's)
    /// size.
    #[test]
    fn k_quants_run_as_q_1_with_f16_scales() {
        let (n, k) = (21, 512);
        for (dtype, kind, block) in [
            (GgmlDType::Q4K, Kind::Q4_1, 20),
            (GgmlDType::Q5K, Kind::Q5_1, 24),
        ] {
            let (bytes, dense) = quantized(dtype, n, k, 3);
            let w = IntPacked::from_ggml(dtype, &bytes, n, k).unwrap();
            assert_eq!(w.kind, kind);
            assert_eq!(w.bytes(), ROWS * 2 * k / QK * block);
            let mut row = vec![0f32; k];
            for j in 0..n {
                w.row_into(j, &mut row);
                let want = &dense[j * k..(j + 1) * k];
                let max = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (t, (got, want)) in row.iter().zip(want).enumerate() {
                    // d * q and m each move by at most 2^-11 of themselves, both at most ~2 max.
                    assert!(
                        (got - want).abs() <= max / 256.0,
                        "{dtype:?} row {j} [{t}]: {got} vs {want}"
                    );
                }
                assert!(row != want, "{dtype:?} row {j}: f16 scales rounded nothing");
            }
            assert!(IntPacked::from_ggml(dtype, &bytes[1..], n, k).is_err());
        }
    }

    #[test]
    fn rejects_what_it_cannot_multiply() {
        let (bytes, _) = quantized(GgmlDType::Q8_0, 2, 64, 1);
        assert!(IntPacked::from_ggml(GgmlDType::Q8_0, &bytes[1..], 2, 64).is_err());
        assert!(IntPacked::from_ggml(GgmlDType::Q8_0, &bytes, 2, 48).is_err());
        assert!(IntPacked::from_ggml(GgmlDType::Q6K, &bytes, 2, 64).is_err());
        assert!(!IntPacked::supports(GgmlDType::F16));
        let a = IntPacked::from_ggml(GgmlDType::Q8_0, &bytes, 2, 64).unwrap();
        let (b4, _) = quantized(GgmlDType::Q4_0, 2, 64, 1);
        let b = IntPacked::from_ggml(GgmlDType::Q4_0, &b4, 2, 64).unwrap();
        assert!(IntPacked::stack(&[&a, &b]).is_err());
    }

    #[test]
    fn zero_and_integer_activations_quantize_exactly() {
        // A block of zeros has scale 0 and contributes nothing; a block whose values are already
        // multiples of max/127 is quantized without error, so the product is the f32 one.
        let (n, k) = (3, 64);
        let (bytes, dense) = quantized(GgmlDType::Q8_0, n, k, 9);
        let w = IntPacked::from_ggml(GgmlDType::Q8_0, &bytes, n, k).unwrap();
        let mut x = vec![0f32; k];
        for (p, v) in x.iter_mut().enumerate().skip(QK) {
            *v = ((p * 37 % 255) as f32 - 127.0) / 4.0;
        }
        x[QK] = 127.0 / 4.0;
        for path in paths() {
            let y = product(path, &x, 1, &w);
            for j in 0..n {
                let exact: f64 = x
                    .iter()
                    .zip(&dense[j * k..(j + 1) * k])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!((y[j] as f64 - exact).abs() < 1e-4, "{path:?} {j}");
            }
        }
    }
}
