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

use candle_core::quantized::GgmlDType;

use crate::gguf::check_block_matrix;
use crate::kernels::PANEL;
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
}

impl BlockKind {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
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
        }
    }

    /// Bytes of one stored GGUF block of [`GROUP`] values.
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
        }
    }

    /// Whether values are kept as 4-bit nibbles (else one signed byte each).
    fn nibbles(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q4_1)
    }

    /// Whether the type adds an offset `m` after scaling.
    fn has_offset(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }

    /// What a stored nibble exceeds the integer it means by (q4_0 stores `q + 8`).
    fn bias(self) -> i32 {
        match self {
            Self::Q4_0 => 8,
            _ => 0,
        }
    }

    /// Bytes of one group of a panel: [`PANEL`] f16 scales, [`PANEL`] f16 offsets if the type
    /// has them, then the values reduction-major (`GROUP / 2` bytes of nibble pairs or `GROUP`
    /// bytes per output).
    fn group_bytes(self) -> usize {
        let scales = if self.has_offset() { 4 } else { 2 } * PANEL;
        let values = if self.nibbles() { GROUP / 2 } else { GROUP } * PANEL;
        scales + values
    }

    /// Decodes one stored block: `d`, `m` (f16 bits; `m` is 0 without an offset) and the integers
    /// `q` with `value = q * d + m`, as candle's `to_float` computes them.
    fn decode(self, b: &[u8], q: &mut [i8; GROUP]) -> (u16, u16) {
        let le16 = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let d = le16(0);
        let (m, rest) = if self.has_offset() {
            (le16(2), &b[4..])
        } else {
            (0, &b[2..])
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
            Self::Q8_0 => {
                for (o, &v) in q.iter_mut().zip(&rest[..GROUP]) {
                    *o = v as i8;
                }
            }
        }
        (d, m)
    }
}

/// The exact f32 value of integer `q` scaled by `d` plus `m`, as [`BlockKind::decode`] defines it.
#[inline(always)]
fn widen_scalar(q: i8, d: u16, m: u16, offset: bool) -> f32 {
    let d = half::f16::from_bits(d).to_f32();
    if offset {
        // q * d is exact (see the module doc), so this rounds once, like candle's `q * d + m`.
        (q as f32 * d) + half::f16::from_bits(m).to_f32()
    } else {
        q as f32 * d
    }
}

/// A block-quantized `[n, k]` matrix in panels of [`PANEL`] output rows: panel `b`'s group `g`
/// (reduction steps `32 g .. 32 g + 32`) is [`BlockKind::group_bytes`] long, holding the rows'
/// scales, offsets and values so that one vector load yields one step of consecutive outputs.
/// Rows past `n` in the last panel are zero.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockPacked {
    kind: BlockKind,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

/// Rows decoded from blocks: the step between GGUF bytes and panels, and back for stacking.
struct Decoded {
    d: Vec<u16>,
    m: Vec<u16>,
    q: Vec<i8>,
}

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
        check_block_matrix(dtype, bytes.len(), n, k, GROUP, kind.block_bytes())?;
        let groups = n * k / GROUP;
        let mut dec = Decoded {
            d: vec![0; groups],
            m: vec![0; groups],
            q: vec![0; n * k],
        };
        for (i, block) in bytes.chunks_exact(kind.block_bytes()).enumerate() {
            let q: &mut [i8; GROUP] = (&mut dec.q[i * GROUP..(i + 1) * GROUP])
                .try_into()
                .expect("GROUP values");
            (dec.d[i], dec.m[i]) = kind.decode(block, q);
        }
        Ok(Self::pack(kind, n, k, &dec))
    }

    fn pack(kind: BlockKind, n: usize, k: usize, dec: &Decoded) -> Self {
        let (groups, gb) = (k / GROUP, kind.group_bytes());
        let mut data = vec![0u8; n.div_ceil(PANEL) * groups * gb];
        for (pi, panel) in data.chunks_exact_mut(groups * gb).enumerate() {
            for (g, out) in panel.chunks_exact_mut(gb).enumerate() {
                for c in 0..PANEL.min(n - pi * PANEL) {
                    let row = pi * PANEL + c;
                    let (d, m) = (dec.d[row * groups + g], dec.m[row * groups + g]);
                    out[2 * c..2 * c + 2].copy_from_slice(&d.to_le_bytes());
                    let mut vals = 2 * PANEL;
                    if kind.has_offset() {
                        out[vals + 2 * c..vals + 2 * c + 2].copy_from_slice(&m.to_le_bytes());
                        vals += 2 * PANEL;
                    }
                    let q = &dec.q[row * k + g * GROUP..row * k + (g + 1) * GROUP];
                    if kind.nibbles() {
                        let bias = kind.bias() as i8;
                        for s in 0..GROUP / 2 {
                            let (lo, hi) = ((q[2 * s] + bias) as u8, (q[2 * s + 1] + bias) as u8);
                            out[vals + s * PANEL + c] = lo | (hi << 4);
                        }
                    } else {
                        for (t, &v) in q.iter().enumerate() {
                            out[vals + t * PANEL + c] = v as u8;
                        }
                    }
                }
            }
        }
        Self { kind, n, k, data }
    }

    /// The rows `rows` decoded, in that order.
    fn unpack(&self, rows: impl ExactSizeIterator<Item = usize>) -> Decoded {
        let (n, k, groups) = (rows.len(), self.k, self.k / GROUP);
        let mut dec = Decoded {
            d: vec![0; n * groups],
            m: vec![0; n * groups],
            q: vec![0; n * k],
        };
        for (i, row) in rows.enumerate() {
            for g in 0..groups {
                let gi = i * groups + g;
                let q = &mut dec.q[i * k + g * GROUP..i * k + (g + 1) * GROUP];
                (dec.d[gi], dec.m[gi]) = self.read(row, g, q);
            }
        }
        dec
    }

    /// Scale, offset and integers of row `row`, group `g`.
    fn read(&self, row: usize, g: usize, q: &mut [i8]) -> (u16, u16) {
        let gb = self.kind.group_bytes();
        let c = row % PANEL;
        let base = (row / PANEL * (self.k / GROUP) + g) * gb;
        let at = |i: usize| u16::from_le_bytes([self.data[base + i], self.data[base + i + 1]]);
        let d = at(2 * c);
        let (m, vals) = if self.kind.has_offset() {
            (at(2 * PANEL + 2 * c), base + 4 * PANEL)
        } else {
            (0, base + 2 * PANEL)
        };
        for (t, o) in q.iter_mut().enumerate() {
            *o = if self.kind.nibbles() {
                let b = self.data[vals + t / 2 * PANEL + c];
                let nib = if t % 2 == 0 { b & 0x0F } else { b >> 4 };
                nib as i8 - self.kind.bias() as i8
            } else {
                self.data[vals + t * PANEL + c] as i8
            };
        }
        (d, m)
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
        let mut all = Decoded {
            d: vec![],
            m: vec![],
            q: vec![],
        };
        for p in parts {
            let dec = p.unpack(0..p.n);
            all.d.extend(dec.d);
            all.m.extend(dec.m);
            all.q.extend(dec.q);
        }
        let n = parts.iter().map(|p| p.n).sum();
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

    /// The matrix of rows `ids`, in that order (each below [`Self::rows`]).
    pub fn select_rows(&self, ids: &[u32]) -> Self {
        let dec = self.unpack(ids.iter().map(|&j| j as usize));
        Self::pack(self.kind, ids.len(), self.k, &dec)
    }

    fn panel(&self, b: usize) -> &[u8] {
        let len = self.k / GROUP * self.kind.group_bytes();
        &self.data[b * len..(b + 1) * len]
    }

    /// Row `j` widened to f32 (`k` values): for embedding lookups.
    pub fn row_into(&self, j: usize, dst: &mut [f32]) {
        let mut q = [0i8; GROUP];
        for (g, out) in dst.chunks_exact_mut(GROUP).take(self.k / GROUP).enumerate() {
            let (d, m) = self.read(j, g, &mut q);
            for (o, &v) in out.iter_mut().zip(&q) {
                *o = widen_scalar(v, d, m, self.kind.has_offset());
            }
        }
    }
}

/// The instruction sets [`matmul`] can run on; every one gives the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
}

impl Isa {
    /// The best this CPU supports, detected at run time.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Self::Avx2;
        }
        Self::Portable
    }

    /// Every instruction set this CPU can run, for tests.
    pub fn available() -> Vec<Self> {
        let mut v = vec![Self::Portable];
        if Self::detect() == Self::Avx2 {
            v.push(Self::Avx2);
        }
        v
    }
}

/// `y[i, j] = sum_p x[i, p] * w[j, p]` for `x: [m, k]`, `y: [m, n]` row-major: bit-identical to
/// [`crate::kernels::matmul_packed`] over the dequantized matrix.
pub fn matmul(x: &[f32], m: usize, w: &BlockPacked, y: &mut [f32]) {
    matmul_on(Isa::detect(), x, m, w, y)
}

/// Batches at least this large widen each group once into an f32 buffer shared by all rows;
/// smaller ones widen in registers for every tile of up to [`DIRECT_ROWS`]. Measured (q4_1
/// gate/up, in cache, one core): m = 2 and 4 cost 1.3x and 1.5x of one row widened in registers,
/// 2.3x and 2.5x through the buffer; at m = 8 the buffer wins, 3.3x against 3.7x.
const WIDEN_ONCE_ROWS: usize = 9;

/// Rows per tile when widening in registers.
const DIRECT_ROWS: usize = 8;

/// [`matmul`] on a given instruction set, which must be in [`Isa::available`].
///
/// Small batches (decoding, short verifications) widen each weight in registers straight into its
/// FMAs: bandwidth is what decoding is short of. Large ones (prefill) widen one group of a panel at
/// a time into an L1-resident f32 buffer and run every row over it, so each weight is widened once
/// per forward; accumulators carry across groups through memory, which holds f32 exactly, so each
/// output is still one FMA chain in order.
pub fn matmul_on(isa: Isa, x: &[f32], m: usize, w: &BlockPacked, y: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert!(x.len() >= m * k && y.len() >= m * n);
    assert!(isa == Isa::Portable || Isa::available().contains(&isa));
    let mut acc = vec![0f32; m * PANEL];
    let mut wide = vec![0f32; GROUP * PANEL];
    let rows: Vec<&[f32]> = x[..m * k].chunks_exact(k).collect();
    for b in 0..n.div_ceil(PANEL) {
        let (panel, j0) = (w.panel(b), b * PANEL);
        if m < WIDEN_ONCE_ROWS {
            for (xs, out) in rows
                .chunks(DIRECT_ROWS)
                .zip(acc.chunks_mut(DIRECT_ROWS * PANEL))
            {
                direct(isa, w.kind, xs, panel, out);
            }
        } else {
            acc.fill(0.0);
            for g in 0..k / GROUP {
                widen_group(isa, w.kind, &panel[g * w.kind.group_bytes()..], &mut wide);
                gemm_group(isa, &x[g * GROUP..], m, k, &wide, &mut acc);
            }
        }
        let cols = (n - j0).min(PANEL);
        for (i, a) in acc.chunks_exact(PANEL).enumerate() {
            y[i * n + j0..i * n + j0 + cols].copy_from_slice(&a[..cols]);
        }
    }
}

/// Up to [`DIRECT_ROWS`] activation rows times one panel, widening in registers; `out` holds
/// `xs.len()` rows of [`PANEL`] outputs.
fn direct(isa: Isa, kind: BlockKind, xs: &[&[f32]], panel: &[u8], out: &mut [f32]) {
    match isa {
        Isa::Portable => portable::direct(kind, xs, panel, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::rows(kind, xs, panel, out),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 => unreachable!("AVX2 is never detected off x86_64"),
    }
}

/// Widens one group of a panel (`group` starts with it) into `wide`, `[GROUP][PANEL]` f32.
fn widen_group(isa: Isa, kind: BlockKind, group: &[u8], wide: &mut [f32]) {
    assert!(group.len() >= kind.group_bytes() && wide.len() == GROUP * PANEL);
    match isa {
        Isa::Portable => portable::widen_group(kind, group, wide),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::widen_group(kind, group, wide),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 => unreachable!("AVX2 is never detected off x86_64"),
    }
}

/// `acc[i][c] += x[i][t] * wide[t][c]` over the group's steps `t` in order, one FMA each, for
/// every row `i < m` (row `i` of `x` starts at `x[i * k]`).
fn gemm_group(isa: Isa, x: &[f32], m: usize, k: usize, wide: &[f32], acc: &mut [f32]) {
    assert!(x.len() >= (m - 1) * k + GROUP && wide.len() == GROUP * PANEL);
    assert!(acc.len() == m * PANEL);
    match isa {
        Isa::Portable => portable::gemm_group(x, m, k, wide, acc),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::gemm_group(x, m, k, wide, acc),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 => unreachable!("AVX2 is never detected off x86_64"),
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
                gemm_group(&x[g * GROUP..], 1, 0, &wide, o);
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
        let mut q = [0i8; GROUP];
        for c in 0..PANEL {
            let (d, m) = w.read(c, 0, &mut q);
            for (t, &v) in q.iter().enumerate() {
                wide[t * PANEL + c] = widen_scalar(v, d, m, kind.has_offset());
            }
        }
    }

    pub fn gemm_group(x: &[f32], m: usize, k: usize, wide: &[f32], acc: &mut [f32]) {
        for (i, a) in acc.chunks_exact_mut(PANEL).take(m).enumerate() {
            let xi = &x[i * k..i * k + GROUP];
            for (t, wt) in wide.chunks_exact(PANEL).enumerate() {
                for (a, w) in a.iter_mut().zip(wt) {
                    *a = xi[t].mul_add(*w, *a);
                }
            }
        }
    }
}

// Register tiles are indexed by row and vector; iterators would hide which register is which.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Groups ahead to prefetch when decoding; one group of a q4_1 panel is 1280 bytes.
    const PREFETCH_GROUPS: usize = 2;

    fn check() {
        assert!(
            Isa::available().contains(&Isa::Avx2),
            "AVX2 kernel on a CPU without AVX2, FMA and F16C"
        );
    }

    pub fn rows(kind: BlockKind, xs: &[&[f32]], panel: &[u8], out: &mut [f32]) {
        check();
        let k = xs[0].len();
        assert!(xs.iter().all(|x| x.len() == k) && out.len() == xs.len() * PANEL);
        assert!(k.is_multiple_of(GROUP) && panel.len() == k / GROUP * kind.group_bytes());
        // SAFETY: the CPU has AVX2, FMA and F16C (checked); `rows_of` reads `k` values of each
        // row, `k / GROUP` groups of `panel` and writes `xs.len() * PANEL` outputs (asserted).
        unsafe {
            match kind {
                BlockKind::Q4_0 => rows_of::<true, false, 8>(xs, panel, out),
                BlockKind::Q4_1 => rows_of::<true, true, 0>(xs, panel, out),
                BlockKind::Q5_0 | BlockKind::Q8_0 => rows_of::<false, false, 0>(xs, panel, out),
                BlockKind::Q5_1 => rows_of::<false, true, 0>(xs, panel, out),
            }
        }
    }

    /// 16 vector registers hold 8 accumulators besides the weights: one row takes all 64 columns
    /// in one pass (8 independent FMA chains hide the FMA latency, and decoding reads each byte
    /// once), more rows take narrower strips.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_of<const NIB: bool, const OFF: bool, const BIAS: i32>(
        xs: &[&[f32]],
        panel: &[u8],
        out: &mut [f32],
    ) {
        match xs.len() {
            1 => strips::<1, 8, NIB, OFF, BIAS>(xs, panel, out),
            2 => strips::<2, 4, NIB, OFF, BIAS>(xs, panel, out),
            3 => strips::<3, 2, NIB, OFF, BIAS>(xs, panel, out),
            4 => strips::<4, 2, NIB, OFF, BIAS>(xs, panel, out),
            5 => strips::<5, 1, NIB, OFF, BIAS>(xs, panel, out),
            6 => strips::<6, 1, NIB, OFF, BIAS>(xs, panel, out),
            7 => strips::<7, 1, NIB, OFF, BIAS>(xs, panel, out),
            8 => strips::<8, 1, NIB, OFF, BIAS>(xs, panel, out),
            r => unreachable!("a direct tile of {r} rows"),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn strips<
        const R: usize,
        const V: usize,
        const NIB: bool,
        const OFF: bool,
        const BIAS: i32,
    >(
        xs: &[&[f32]],
        panel: &[u8],
        out: &mut [f32],
    ) {
        let xs: [*const f32; R] = std::array::from_fn(|r| xs[r].as_ptr());
        let k = panel.len() / group_bytes::<NIB, OFF>() * GROUP;
        for col in (0..PANEL).step_by(8 * V) {
            let acc = strip::<R, V, NIB, OFF, BIAS>(&xs, k, panel, col);
            for r in 0..R {
                for v in 0..V {
                    _mm256_storeu_ps(out.as_mut_ptr().add(r * PANEL + col + 8 * v), acc[r][v]);
                }
            }
        }
    }

    /// Columns `col .. col + 8 V` of `R` rows, every group, widening in registers. Each lane is
    /// one output's accumulator and takes one FMA per reduction step, in order.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn strip<
        const R: usize,
        const V: usize,
        const NIB: bool,
        const OFF: bool,
        const BIAS: i32,
    >(
        xs: &[*const f32; R],
        k: usize,
        panel: &[u8],
        col: usize,
    ) -> [[__m256; V]; R] {
        let gb = group_bytes::<NIB, OFF>();
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for g in 0..k / GROUP {
            let base = panel.as_ptr().add(g * gb);
            let ahead = base.wrapping_add(PREFETCH_GROUPS * gb);
            for line in (0..gb).step_by(64) {
                // A prefetch never faults; wrapping_add keeps the arithmetic defined past the end.
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
            }
            let sc: [(__m256, __m256); V] =
                std::array::from_fn(|v| scales::<OFF>(base, col + 8 * v));
            let q = base.add(scale_bytes::<OFF>() + col);
            let p0 = g * GROUP;
            if NIB {
                for s in 0..GROUP / 2 {
                    for v in 0..V {
                        let (wl, wh) =
                            nibble_pair::<OFF, BIAS>(q.add(s * PANEL + 8 * v), sc[v].0, sc[v].1);
                        for r in 0..R {
                            let x = xs[r].add(p0 + 2 * s);
                            acc[r][v] = _mm256_fmadd_ps(_mm256_set1_ps(*x), wl, acc[r][v]);
                            acc[r][v] = _mm256_fmadd_ps(_mm256_set1_ps(*x.add(1)), wh, acc[r][v]);
                        }
                    }
                }
            } else {
                for t in 0..GROUP {
                    for v in 0..V {
                        let w = byte::<OFF>(q.add(t * PANEL + 8 * v), sc[v].0, sc[v].1);
                        for r in 0..R {
                            let x = _mm256_set1_ps(*xs[r].add(p0 + t));
                            acc[r][v] = _mm256_fmadd_ps(x, w, acc[r][v]);
                        }
                    }
                }
            }
        }
        acc
    }

    pub fn widen_group(kind: BlockKind, group: &[u8], wide: &mut [f32]) {
        check();
        assert!(group.len() >= kind.group_bytes() && wide.len() == GROUP * PANEL);
        // SAFETY: the CPU has AVX2, FMA and F16C (checked); `widen_group_of` reads one group
        // (`kind.group_bytes()`, asserted) and writes `GROUP * PANEL` floats (asserted).
        unsafe {
            match kind {
                BlockKind::Q4_0 => widen_group_of::<true, false, 8>(group, wide),
                BlockKind::Q4_1 => widen_group_of::<true, true, 0>(group, wide),
                BlockKind::Q5_0 | BlockKind::Q8_0 => widen_group_of::<false, false, 0>(group, wide),
                BlockKind::Q5_1 => widen_group_of::<false, true, 0>(group, wide),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen_group_of<const NIB: bool, const OFF: bool, const BIAS: i32>(
        group: &[u8],
        wide: &mut [f32],
    ) {
        let (base, out) = (group.as_ptr(), wide.as_mut_ptr());
        for v in 0..8 {
            let (scale, offset) = scales::<OFF>(base, 8 * v);
            let q = base.add(scale_bytes::<OFF>() + 8 * v);
            let o = out.add(8 * v);
            if NIB {
                for s in 0..GROUP / 2 {
                    let (wl, wh) = nibble_pair::<OFF, BIAS>(q.add(s * PANEL), scale, offset);
                    _mm256_storeu_ps(o.add(2 * s * PANEL), wl);
                    _mm256_storeu_ps(o.add((2 * s + 1) * PANEL), wh);
                }
            } else {
                for t in 0..GROUP {
                    _mm256_storeu_ps(
                        o.add(t * PANEL),
                        byte::<OFF>(q.add(t * PANEL), scale, offset),
                    );
                }
            }
        }
    }

    pub fn gemm_group(x: &[f32], m: usize, k: usize, wide: &[f32], acc: &mut [f32]) {
        check();
        assert!(x.len() >= (m - 1) * k + GROUP && wide.len() == GROUP * PANEL);
        assert!(acc.len() == m * PANEL);
        let mut i = 0;
        while i < m {
            let r = (m - i).min(6);
            let (xs, a) = (&x[i * k..], &mut acc[i * PANEL..(i + r) * PANEL]);
            // SAFETY: the CPU has AVX2, FMA and F16C (checked); `tile` reads GROUP values of each
            // of its `r` rows of `x` (the last at (r - 1) k, inside `xs` by the assert above), all
            // of `wide`, and reads and writes `r * PANEL` accumulators.
            unsafe {
                match r {
                    1 => tile::<1, 8>(xs, k, wide, a),
                    2 => tile::<2, 4>(xs, k, wide, a),
                    3 => tile::<3, 4>(xs, k, wide, a),
                    4 => tile::<4, 2>(xs, k, wide, a),
                    5 => tile::<5, 2>(xs, k, wide, a),
                    _ => tile::<6, 2>(xs, k, wide, a),
                }
            }
            i += r;
        }
    }

    /// `R` rows over the widened group, in strips of `8 V` columns: 16 vector registers hold at
    /// most 12 accumulators besides the weights and a broadcast.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const R: usize, const V: usize>(
        x: &[f32],
        k: usize,
        wide: &[f32],
        acc: &mut [f32],
    ) {
        let (w, a) = (wide.as_ptr(), acc.as_mut_ptr());
        for col in (0..PANEL).step_by(8 * V) {
            let mut s: [[__m256; V]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|v| _mm256_loadu_ps(a.add(r * PANEL + col + 8 * v)))
            });
            for t in 0..GROUP {
                let wt: [__m256; V] =
                    std::array::from_fn(|v| _mm256_loadu_ps(w.add(t * PANEL + col + 8 * v)));
                for r in 0..R {
                    let xv = _mm256_set1_ps(*x.as_ptr().add(r * k + t));
                    for v in 0..V {
                        s[r][v] = _mm256_fmadd_ps(xv, wt[v], s[r][v]);
                    }
                }
            }
            for r in 0..R {
                for v in 0..V {
                    _mm256_storeu_ps(a.add(r * PANEL + col + 8 * v), s[r][v]);
                }
            }
        }
    }

    const fn scale_bytes<const OFF: bool>() -> usize {
        if OFF {
            4 * PANEL
        } else {
            2 * PANEL
        }
    }

    const fn group_bytes<const NIB: bool, const OFF: bool>() -> usize {
        scale_bytes::<OFF>() + if NIB { GROUP / 2 } else { GROUP } * PANEL
    }

    /// The scales (and offsets) of columns `col .. col + 8` of the group at `base`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn scales<const OFF: bool>(base: *const u8, col: usize) -> (__m256, __m256) {
        let sp = base.cast::<u16>().add(col);
        let scale = _mm256_cvtph_ps(_mm_loadu_si128(sp.cast()));
        let offset = if OFF {
            _mm256_cvtph_ps(_mm_loadu_si128(sp.add(PANEL).cast()))
        } else {
            _mm256_setzero_ps()
        };
        (scale, offset)
    }

    /// Two reduction steps of 8 columns from 8 bytes of nibble pairs at `q`, widened.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn nibble_pair<const OFF: bool, const BIAS: i32>(
        q: *const u8,
        scale: __m256,
        offset: __m256,
    ) -> (__m256, __m256) {
        let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.cast()));
        let mut lo = _mm256_and_si256(b, _mm256_set1_epi32(0x0F));
        let mut hi = _mm256_srli_epi32::<4>(b);
        if BIAS != 0 {
            lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(BIAS));
            hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(BIAS));
        }
        (
            widen::<OFF>(lo, scale, offset),
            widen::<OFF>(hi, scale, offset),
        )
    }

    /// One reduction step of 8 columns from 8 signed bytes at `q`, widened.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn byte<const OFF: bool>(q: *const u8, scale: __m256, offset: __m256) -> __m256 {
        widen::<OFF>(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.cast())),
            scale,
            offset,
        )
    }

    /// Integers `qi` times the scales, plus the offsets if the type has them. `q * d` is exact,
    /// so `fma(q, d, m)` is the once-rounded `q * d + m` (module doc).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn widen<const OFF: bool>(qi: __m256i, scale: __m256, offset: __m256) -> __m256 {
        let qf = _mm256_cvtepi32_ps(qi);
        if OFF {
            _mm256_fmadd_ps(qf, scale, offset)
        } else {
            _mm256_mul_ps(qf, scale)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{matmul_packed, Packed};
    use crate::testing::{quantized_matrix as quantized, test_values as vals};
    use proptest::prelude::*;

    const KINDS: [GgmlDType; 5] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ];

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn rows_widen_to_candles_dequantization() {
        let (n, k) = (70, 96);
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

    #[test]
    fn bad_shapes_are_errors() {
        let (bytes, _) = quantized(GgmlDType::Q4_1, 4, 64, 1);
        assert!(BlockPacked::from_ggml(GgmlDType::Q4_1, &bytes[1..], 4, 64).is_err());
        assert!(BlockPacked::from_ggml(GgmlDType::Q4_1, &bytes, 4, 48).is_err());
        assert!(BlockPacked::from_ggml(GgmlDType::Q4K, &bytes, 4, 64).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Every output equals the packed-f32 product over candle's dequantized matrix, bit for
        /// bit, on every instruction set and batch size.
        #[test]
        fn matmul_equals_the_dequantized_f32_product(
            kind in 0usize..5, m in 1usize..33, n in 1usize..150, groups in 1usize..5, seed: u64,
        ) {
            let (dtype, k) = (KINDS[kind], groups * GROUP);
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
            kind in 0usize..5, ns in proptest::collection::vec(1usize..140, 1..4), seed: u64,
        ) {
            let (dtype, k) = (KINDS[kind], 64);
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
