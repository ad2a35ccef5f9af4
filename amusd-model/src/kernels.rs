//! Batch-invariant CPU kernels.
//!
//! Speculative decoding is only exact if the verify model's logits at a position do not depend on
//! how many other positions were computed in the same forward pass. BLAS-style GEMMs break that:
//! they pick blockings, split the reduction and take a GEMV path for one row by problem shape, so the
//! reduction order of a dot product, and hence its rounding, changes with the batch size.
//!
//! Here every matrix-multiply output is one chain of fused multiply-adds in index order
//! ([`matmul_packed`]), and every other dot product goes through [`dot`], whose order depends only on
//! its length. Tiling is over *independent* outputs, never over the reduction, so an element's bits
//! are the same whether it was computed alone or inside a 32-token batch.

/// Lanes of independent partial sums in [`dot`]. Fixed: changing it changes every result's rounding.
const LANES: usize = 16;

/// Reduces `acc` in a fixed pairwise order.
// The portable dot body's parts; SIMD builds use them only in tests.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        any(target_feature = "avx512f", target_feature = "avx2")
    ),
    allow(dead_code)
)]
#[inline(always)]
fn reduce(acc: [f32; LANES]) -> f32 {
    let mut a = acc;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            a[l] += a[l + width];
        }
        width /= 2;
    }
    a[0]
}

/// One step of every lane: `acc[l] += a[l] * b[l]`, fused. Fixed-size arrays so the compiler sees
/// no bounds checks and emits one vector FMA per register.
// The portable dot body's parts; SIMD builds use them only in tests.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        any(target_feature = "avx512f", target_feature = "avx2")
    ),
    allow(dead_code)
)]
#[inline(always)]
fn fma_lanes(acc: &mut [f32; LANES], a: &[f32; LANES], b: &[f32; LANES]) {
    for l in 0..LANES {
        acc[l] = a[l].mul_add(b[l], acc[l]);
    }
}

// The portable dot body's parts; SIMD builds use them only in tests.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        any(target_feature = "avx512f", target_feature = "avx2")
    ),
    allow(dead_code)
)]
#[inline(always)]
fn lanes(s: &[f32], c: usize) -> &[f32; LANES] {
    s[c..c + LANES].try_into().expect("LANES-wide chunk")
}

/// Dot product with a reduction order that depends only on `a.len()`.
///
/// Lane `l` accumulates elements `l, l + LANES, ...` with fused multiply-adds (vectorised by the
/// compiler), the lanes are then reduced pairwise, and the tail is added last in index order.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let body = n - n % LANES;
    let mut s = simd::dot_body(&a[..body], &b[..body]);
    for i in body..n {
        s = a[i].mul_add(b[i], s);
    }
    s
}

/// The portable [`dot`] body: the definition the SIMD version must match bit for bit.
#[inline(always)]
#[cfg_attr(
    all(
        target_arch = "x86_64",
        any(target_feature = "avx512f", target_feature = "avx2")
    ),
    allow(dead_code)
)]
fn dot_body_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for c in (0..a.len()).step_by(LANES) {
        fma_lanes(&mut acc, lanes(a, c), lanes(b, c));
    }
    reduce(acc)
}

/// Output columns (weight rows) per packed panel: four 16-lane vectors.
pub const PANEL: usize = 64;

/// Activation rows per register tile: 6 rows x 4 vectors of accumulators, plus the 4 weight vectors
/// of the current reduction step and one broadcast, fill 29 of AVX-512's 32 vector registers.
const TILE_ROWS: usize = 6;

/// A weight matrix `[n, k]` (`n` output rows of `k` inputs) stored for [`matmul_packed`]: panels of
/// [`PANEL`] consecutive rows, each laid out reduction-major (`panel[p * PANEL + c]` is element `p`
/// of row `b * PANEL + c`), the last panel padded with zero rows.
///
/// That layout lets the kernel hold one accumulator per *output* in a vector lane and walk the
/// reduction as a single chain of fused multiply-adds, so no output ever needs a horizontal sum.
#[derive(Clone, Debug, PartialEq)]
pub struct Packed<T> {
    n: usize,
    k: usize,
    data: Vec<T>,
}

/// Element types a packed matrix may hold. Each widens to f32 exactly, so a product over f16 or
/// bf16 weights has the bits of the f32 product over the widened matrix.
pub trait Widen: Copy + Default + Send + Sync + 'static {
    fn widen(self) -> f32;

    /// 16 consecutive values from `p`, widened.
    ///
    /// # Safety
    /// `p` must point to 16 readable values.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;

    /// 8 consecutive values from `p`, widened.
    ///
    /// # Safety
    /// `p` must point to 8 readable values.
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c",
        not(target_feature = "avx512f")
    ))]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Widen for f32 {
    fn widen(self) -> f32 {
        self
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c",
        not(target_feature = "avx512f")
    ))]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Widen for half::f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c",
        not(target_feature = "avx512f")
    ))]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

impl Widen for half::bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32: zero-extend each value and move it up.
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(p.cast()),
        )))
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c",
        not(target_feature = "avx512f")
    ))]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(p.cast()),
        )))
    }
}

impl<T: Widen> Packed<T> {
    /// Packs a row-major `[n, k]` matrix.
    pub fn from_rows(rows: &[T], n: usize, k: usize) -> Self {
        Self::from_vec(rows.to_vec(), n, k)
    }

    /// Packs a row-major `[n, k]` matrix in place. A panel's rows occupy the same bytes before and
    /// after packing, so each is transposed through one scratch panel and no second copy of the
    /// matrix is allocated: with one, page faults on a fresh 540 MB made loading the f32 model take
    /// ~1.2 s instead of ~0.6 s.
    pub fn from_vec(rows: Vec<T>, n: usize, k: usize) -> Self {
        assert_eq!(rows.len(), n * k, "packing a {n}x{k} matrix");
        let mut data = rows;
        data.resize(n.div_ceil(PANEL) * PANEL * k, T::default());
        let mut scratch = vec![T::default(); PANEL * k];
        for panel in data.chunks_exact_mut(PANEL * k) {
            scratch.copy_from_slice(panel);
            pack_panel(&scratch, k, panel);
        }
        Self { n, k, data }
    }

    /// The matrix whose rows are those of `parts` in order (all `k` wide).
    pub fn stack(parts: &[&Self]) -> Self {
        let k = parts.first().map_or(0, |p| p.k);
        assert!(
            parts.iter().all(|p| p.k == k),
            "stacking matrices of different widths"
        );
        assert!(!parts.is_empty(), "stacking no matrices");
        let n: usize = parts.iter().map(|p| p.n).sum();
        let panels: Vec<_> = parts.iter().map(|p| (p.n, p.data.as_slice())).collect();
        if let Some(data) = whole_panels(&panels, PANEL) {
            return Self { n, k, data };
        }
        let rows: Vec<T> = parts.iter().flat_map(|p| p.to_rows()).collect();
        Self::from_rows(&rows, n, k)
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// The matrix of rows `ids`, in that order (each below [`Self::rows`]).
    pub fn select_rows(&self, ids: &[u32]) -> Self {
        let mut rows = Vec::with_capacity(ids.len() * self.k);
        for &j in ids {
            self.extend_row(j as usize, &mut rows);
        }
        Self::from_vec(rows, ids.len(), self.k)
    }

    /// Resident bytes, the padding of the last panel included.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.data.as_slice())
    }

    /// Where the weights lie: start address and bytes.
    pub fn span(&self) -> (usize, usize) {
        (self.data.as_ptr() as usize, self.bytes())
    }

    /// Number of panels, `ceil(n / PANEL)`.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// Panel `b`: `k * PANEL` values, reduction-major.
    pub fn panel(&self, b: usize) -> &[T] {
        &self.data[b * PANEL * self.k..(b + 1) * PANEL * self.k]
    }

    /// Writes row `j` as f32 into `dst` (`k` values): a strided gather, for embedding lookups.
    pub fn row_into(&self, j: usize, dst: &mut [f32]) {
        let panel = self.panel(j / PANEL);
        for (p, d) in dst.iter_mut().enumerate().take(self.k) {
            *d = panel[p * PANEL + j % PANEL].widen();
        }
    }

    /// The matrix back in row-major order.
    pub fn to_rows(&self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for j in 0..self.n {
            self.extend_row(j, &mut out);
        }
        out
    }

    fn extend_row(&self, j: usize, out: &mut Vec<T>) {
        let panel = self.panel(j / PANEL);
        out.extend((0..self.k).map(|p| panel[p * PANEL + j % PANEL]));
    }
}

/// Lays out up to [`PANEL`] row-major rows of `k` values (`rows`) as one panel (`k * PANEL`
/// values); columns past the last row are zero.
pub fn pack_panel<T: Widen>(rows: &[T], k: usize, panel: &mut [T]) {
    let count = rows.len().checked_div(k).unwrap_or(0);
    assert!(count <= PANEL && panel.len() == k * PANEL);
    // Written in order; the reads walk the rows side by side, each cache line of them used for 16
    // consecutive steps.
    for (p, out) in panel.chunks_exact_mut(PANEL).enumerate() {
        let (used, padding) = out.split_at_mut(count);
        for (c, o) in used.iter_mut().enumerate() {
            *o = rows[c * k + p];
        }
        padding.fill(T::default());
    }
}

/// `y[i, j] = sum_p x[i, p] * w[j, p]` for `x: [m, k]` and `y: [m, n]` row-major, `w` packed.
///
/// Every output is one chain of fused multiply-adds over `p = 0, 1, ..., k-1`, starting from zero,
/// whichever tile, batch size or instruction set computes it: its bits depend on its own row of `x`
/// and of `w` only, which is what makes batched verification exact. Panels are the outer loop so
/// each is read from memory once and reused from cache by every activation row: a k-token
/// verification costs little more than one token while it is bandwidth-bound.
pub fn matmul_packed<T: Widen>(x: &[f32], m: usize, w: &Packed<T>, y: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert!(x.len() >= m * k && y.len() >= m * n);
    for b in 0..w.panels() {
        panel_product(x, m, k, w.panel(b), y, n, b * PANEL);
    }
}

/// As [`matmul_packed`] for weights kept in a form the kernel cannot read (block-quantized rows):
/// `widen_panel(b, dst)` writes panel `b` as f32 into `dst` (`k * PANEL` values, same layout). The
/// results are bit-identical to [`matmul_packed`] on the widened matrix.
pub fn matmul_widened(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    y: &mut [f32],
    mut widen_panel: impl FnMut(usize, &mut [f32]),
) {
    assert!(x.len() >= m * k && y.len() >= m * n);
    let mut buf = vec![0f32; PANEL * k];
    for b in 0..n.div_ceil(PANEL) {
        widen_panel(b, &mut buf);
        panel_product(x, m, k, &buf, y, n, b * PANEL);
    }
}

/// Output columns `j0..min(j0 + PANEL, n)` of `y`, from one panel.
fn panel_product<T: Widen>(
    x: &[f32],
    m: usize,
    k: usize,
    panel: &[T],
    y: &mut [f32],
    n: usize,
    j0: usize,
) {
    assert!(panel.len() >= k * PANEL && x.len() >= m * k && j0 < n && y.len() >= m * n);
    let cols = (n - j0).min(PANEL);
    let mut i = 0;
    while i + TILE_ROWS <= m {
        tile::<TILE_ROWS, T>(x, i, k, panel, y, n, j0, cols);
        i += TILE_ROWS;
    }
    match m - i {
        0 => {}
        1 => tile::<1, T>(x, i, k, panel, y, n, j0, cols),
        2 => tile::<2, T>(x, i, k, panel, y, n, j0, cols),
        3 => tile::<3, T>(x, i, k, panel, y, n, j0, cols),
        4 => tile::<4, T>(x, i, k, panel, y, n, j0, cols),
        _ => tile::<5, T>(x, i, k, panel, y, n, j0, cols),
    }
}

/// Rows `i..i + R` of the panel product, written to `y[.., j0..j0 + cols]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile<const R: usize, T: Widen>(
    x: &[f32],
    i: usize,
    k: usize,
    panel: &[T],
    y: &mut [f32],
    n: usize,
    j0: usize,
    cols: usize,
) {
    let xs: [&[f32]; R] = std::array::from_fn(|r| &x[(i + r) * k..(i + r + 1) * k]);
    let acc = simd::tile(xs, &panel[..k * PANEL]);
    for (r, row) in acc.iter().enumerate() {
        y[(i + r) * n + j0..(i + r) * n + j0 + cols].copy_from_slice(&row[..cols]);
    }
}

/// The register tile. Each lane holds one output's accumulator and takes exactly one FMA per
/// reduction step, in order, so every path below gives the same bits (an FMA rounds once, however
/// it is issued).
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod simd {
    use super::{prefetch_range, Widen, LANES, PANEL};
    use std::arch::x86_64::*;
    /// How many reduction steps (of `PANEL` weights, 256 bytes of f32) ahead the tile prefetches.
    /// The hardware prefetcher alone fell behind once a tile had several rows' FMAs per step: a
    /// k = 8 forward of the f32 model took 77 ms without it, 59-62 ms at 8, 16, 32 or 64 steps
    /// ahead, 1-token forwards unchanged (one core, 200-token context).
    const PREFETCH_STEPS: usize = 16;

    /// [`super::dot`] over a multiple of 16 elements: one vector of lanes, then the pairwise tree
    /// of [`super::reduce`] done as halving vector adds (each lane adds the same pair, so the same
    /// bits) instead of a store and fifteen scalar adds: attention scores are short dots, where the
    /// reduction was most of the cost.
    #[inline(always)]
    pub fn dot_body(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        assert!(n.is_multiple_of(LANES) && b.len() == n);
        // SAFETY: avx512f is enabled at compile time; loads read 16 floats at c < n, inside both
        // slices (asserted).
        unsafe {
            let mut acc = _mm512_setzero_ps();
            let mut c = 0;
            while c < n {
                acc = _mm512_fmadd_ps(
                    _mm512_loadu_ps(a.as_ptr().add(c)),
                    _mm512_loadu_ps(b.as_ptr().add(c)),
                    acc,
                );
                c += LANES;
            }
            let lo = _mm512_castps512_ps256(acc);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
            let s8 = _mm256_add_ps(lo, hi);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
            _mm_cvtss_f32(s1)
        }
    }

    #[inline(always)]
    pub fn tile<const R: usize, T: Widen>(xs: [&[f32]; R], panel: &[T]) -> [[f32; PANEL]; R] {
        let k = panel.len() / PANEL;
        assert!(xs.iter().all(|x| x.len() == k));
        // SAFETY: avx512f is enabled at compile time (cfg above). Weight loads read PANEL floats at
        // offset p * PANEL with p < k, inside `panel` (k * PANEL long); activation reads are at p < k
        // of rows of length k (both asserted); stores write R * PANEL floats into `out`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            let w = panel.as_ptr();
            for p in 0..k {
                let wp = w.add(p * PANEL);
                // Running past the panel's end reaches the next panel, which is read next.
                let ahead = wp.wrapping_add(PREFETCH_STEPS * PANEL).cast::<u8>();
                prefetch_range(ahead, PANEL * size_of::<T>());
                let wv = [
                    T::load16(wp),
                    T::load16(wp.add(16)),
                    T::load16(wp.add(32)),
                    T::load16(wp.add(48)),
                ];
                for r in 0..R {
                    let xv = _mm512_set1_ps(*xs[r].get_unchecked(p));
                    for v in 0..4 {
                        acc[r][v] = _mm512_fmadd_ps(xv, wv[v], acc[r][v]);
                    }
                }
            }
            let mut out = [[0f32; PANEL]; R];
            for (o, a) in out.iter_mut().zip(&acc) {
                for (v, a) in a.iter().enumerate() {
                    _mm512_storeu_ps(o.as_mut_ptr().add(16 * v), *a);
                }
            }
            out
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c",
    not(target_feature = "avx512f")
))]
mod simd {
    use super::{Widen, LANES, PANEL};
    use std::arch::x86_64::*;

    /// [`super::dot`] over a multiple of 16 elements: the 16 lanes as two vectors, then the
    /// pairwise tree of [`super::reduce`] as halving vector adds (each lane adds the same pair, so
    /// the same bits). Attention scores are short dots (64 elements), where a scalar tree of
    /// fifteen adds was a tenth of a decoding forward.
    #[inline(always)]
    pub fn dot_body(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        assert!(n.is_multiple_of(LANES) && b.len() == n);
        // SAFETY: avx2 and fma are enabled at compile time (cfg above); loads read 8 floats at
        // c and c + 8 with c + 16 <= n, inside both slices (asserted).
        unsafe {
            let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut c = 0;
            while c < n {
                let (pa, pb) = (a.as_ptr().add(c), b.as_ptr().add(c));
                lo = _mm256_fmadd_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb), lo);
                hi = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8)), hi);
                c += LANES;
            }
            let s8 = _mm256_add_ps(lo, hi);
            let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
            let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
            let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
            _mm_cvtss_f32(s1)
        }
    }

    /// Sixteen vector registers cannot hold a 64-column tile of several rows, so the panel is
    /// done in strips as wide as the registers allow: one row keeps 8 independent chains over all
    /// 64 columns (a single pass, as memory-bound decoding wants), 2-3 rows take 32-column strips,
    /// more rows 16-column strips (at most 12 accumulators).
    #[inline(always)]
    pub fn tile<const R: usize, T: Widen>(xs: [&[f32]; R], panel: &[T]) -> [[f32; PANEL]; R] {
        let k = panel.len() / PANEL;
        assert!(R <= 6 && xs.iter().all(|x| x.len() == k));
        let mut out = [[0f32; PANEL]; R];
        match R {
            1 => strip::<R, 8, T>(&xs, panel, 0, &mut out),
            2 | 3 => {
                for col in [0, 32] {
                    strip::<R, 4, T>(&xs, panel, col, &mut out);
                }
            }
            _ => {
                for col in [0, 16, 32, 48] {
                    strip::<R, 2, T>(&xs, panel, col, &mut out);
                }
            }
        }
        out
    }

    /// Columns `col..col + 8 * V` of the tile.
    #[inline(always)]
    fn strip<const R: usize, const V: usize, T: Widen>(
        xs: &[&[f32]; R],
        panel: &[T],
        col: usize,
        out: &mut [[f32; PANEL]; R],
    ) {
        let k = panel.len() / PANEL;
        assert!(col + 8 * V <= PANEL && xs.iter().all(|x| x.len() == k));
        // SAFETY: avx2, fma and f16c are enabled at compile time (cfg above). Weight loads read 8
        // values at p * PANEL + col + 8 * v with p < k and col + 8 * V <= PANEL, inside `panel`
        // (k * PANEL long); activation reads are at p < k of rows of length k; stores write 8
        // floats at col + 8 * v + 8 <= PANEL of each `out` row (all asserted).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); V]; R];
            let w = panel.as_ptr().add(col);
            for p in 0..k {
                let wp = w.add(p * PANEL);
                let wv: [__m256; V] = std::array::from_fn(|v| T::load8(wp.add(8 * v)));
                for r in 0..R {
                    let xv = _mm256_set1_ps(*xs[r].get_unchecked(p));
                    for v in 0..V {
                        acc[r][v] = _mm256_fmadd_ps(xv, wv[v], acc[r][v]);
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(&acc) {
                for (v, a) in a.iter().enumerate() {
                    _mm256_storeu_ps(o.as_mut_ptr().add(col + 8 * v), *a);
                }
            }
        }
    }
}

#[cfg(not(any(
    all(target_arch = "x86_64", target_feature = "avx512f"),
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c",
        not(target_feature = "avx512f")
    )
)))]
mod simd {
    use super::{Widen, PANEL};

    pub(super) use super::dot_body_portable as dot_body;

    /// Portable version: the same chains, vectorised as well as the compiler manages.
    #[inline(always)]
    pub fn tile<const R: usize, T: Widen>(xs: [&[f32]; R], panel: &[T]) -> [[f32; PANEL]; R] {
        let k = panel.len() / PANEL;
        let mut acc = [[0f32; PANEL]; R];
        for (p, wp) in panel.chunks_exact(PANEL).enumerate().take(k) {
            for r in 0..R {
                let xv = xs[r][p];
                for (a, w) in acc[r].iter_mut().zip(wp) {
                    *a = xv.mul_add(w.widen(), *a);
                }
            }
        }
        acc
    }
}

/// RMSNorm of each `dim`-wide row of `x` in place: `x * weight / sqrt(mean(x^2) + eps)`.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for row in x.chunks_exact_mut(dim) {
        let ss = dot(row, row);
        let scale = 1.0 / (ss / dim as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * scale * *w;
        }
    }
}

/// The storage of matrices stacked by rows (each part given as its rows and its packed data) when
/// every part but the last fills whole panels of `panel_rows` rows: the parts' panels in order,
/// the last part's padding rows staying last. `None` when an earlier part ends mid-panel (or
/// there are no parts): its rows must be repacked.
pub(crate) fn whole_panels<T: Copy>(parts: &[(usize, &[T])], panel_rows: usize) -> Option<Vec<T>> {
    let (_, init) = parts.split_last()?;
    if !init.iter().all(|(n, _)| n.is_multiple_of(panel_rows)) {
        return None;
    }
    let mut data = Vec::with_capacity(parts.iter().map(|(_, d)| d.len()).sum());
    for (_, d) in parts {
        data.extend_from_slice(d);
    }
    Some(data)
}

/// Prefetches every cache line of the `bytes` bytes at `start` into L1. A prefetch never faults
/// and reads nothing architecturally, so `start` may lie past the end of its buffer (the kernels
/// prefetch a fixed distance ahead and run off the end of the last panel or position); callers
/// compute it with `wrapping_add`, which keeps that arithmetic defined. A no-op off x86-64.
#[inline(always)]
pub fn prefetch_range(start: *const u8, bytes: usize) {
    prefetch_lines::<false>(start, bytes);
}

/// [`prefetch_range`] into L2 (and L3), not L1: measured faster for attention's scans of the KV
/// cache and the exact kernels' weight panels (the notes where they call it).
#[inline(always)]
pub fn prefetch_range_l2(start: *const u8, bytes: usize) {
    prefetch_lines::<true>(start, bytes);
}

#[inline(always)]
fn prefetch_lines<const L2: bool>(start: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes).step_by(64) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        let p = start.wrapping_add(line).cast();
        // SAFETY: SSE is part of x86-64, and a prefetch neither faults nor reads architecturally.
        unsafe {
            match L2 {
                true => _mm_prefetch::<_MM_HINT_T1>(p),
                false => _mm_prefetch::<_MM_HINT_T0>(p),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, bytes);
}

/// Index of the largest value; ties go to the lowest index and NaN never wins, so the choice is a
/// pure function of the logits' bits. Every greedy position of both models pays for one over the
/// whole vocabulary; the AVX path (chosen at run time) returns what [`argmax_reference`] does.
pub fn argmax(logits: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked just above).
        return unsafe { argmax_avx::argmax(logits) };
    }
    argmax_reference(logits)
}

/// The definition of [`argmax`]: the first strictly greater value wins.
pub fn argmax_reference(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

#[cfg(target_arch = "x86_64")]
mod argmax_avx {
    use std::arch::x86_64::*;

    /// Two passes: the maximum, with independent lanes (a compare-and-branch chain per element is
    /// what made the scalar loop slow), then the first index holding it. NaN never wins: `maxps`
    /// returns its second operand when either is NaN, and the running maximum is that operand.
    /// If no value exceeds -inf the answer is 0, as in the reference.
    ///
    /// # Safety
    /// The CPU must have AVX.
    #[target_feature(enable = "avx")]
    pub unsafe fn argmax(logits: &[f32]) -> u32 {
        const W: usize = 32;
        let p = logits.as_ptr();
        let body = logits.len() / W * W;
        let mut acc = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
        for i in (0..body).step_by(W) {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8 j + 8 <= body <= len.
                *a = _mm256_max_ps(_mm256_loadu_ps(p.add(i + 8 * j)), *a);
            }
        }
        let mut lanes = [0f32; 8];
        let m = _mm256_max_ps(_mm256_max_ps(acc[0], acc[1]), _mm256_max_ps(acc[2], acc[3]));
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let mut max = f32::NEG_INFINITY;
        for &v in lanes.iter().chain(&logits[body..]) {
            if v > max {
                max = v;
            }
        }
        if max == f32::NEG_INFINITY {
            return 0;
        }
        let target = _mm256_set1_ps(max);
        let mut i = 0;
        while i + 8 <= logits.len() {
            // SAFETY: i + 8 <= len.
            let eq = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_loadu_ps(p.add(i)), target);
            let mask = _mm256_movemask_ps(eq);
            if mask != 0 {
                return (i + mask.trailing_zeros() as usize) as u32;
            }
            i += 8;
        }
        let rest = logits[i..].iter().position(|&v| v == max);
        (i + rest.expect("the maximum is one of the values")) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = x[i * k..(i + 1) * k]
                    .iter()
                    .zip(&w[j * k..(j + 1) * k])
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    use crate::testing::test_values as vals;

    /// The defining order: one FMA chain over the reduction, from zero.
    fn chain(x: &[f32], w: &[f32]) -> f32 {
        x.iter().zip(w).fold(0f32, |acc, (a, b)| a.mul_add(*b, acc))
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn dot_matches_its_portable_definition(len in 0usize..200, seed: u64) {
            let (a, b) = (vals(len, seed), vals(len, !seed));
            let body = len - len % LANES;
            let mut want = dot_body_portable(&a[..body], &b[..body]);
            for i in body..len {
                want = a[i].mul_add(b[i], want);
            }
            prop_assert_eq!(want.to_bits(), dot(&a, &b).to_bits());
        }

        /// Each output is bit-identical to its FMA chain (so to computing its row alone, on any
        /// instruction set), and close to f64 truth.
        #[test]
        fn matmul_outputs_are_their_fma_chains(m in 1usize..33, n in 1usize..150, k in 1usize..70, seed: u64) {
            let x = vals(m * k, seed);
            let w = vals(n * k, seed ^ 0xdead);
            let mut y = vec![f32::NAN; m * n];
            matmul_packed(&x, m, &Packed::from_rows(&w, n, k), &mut y);
            let want: Vec<f32> = (0..m * n)
                .map(|e| chain(&x[e / n * k..(e / n + 1) * k], &w[e % n * k..(e % n + 1) * k]))
                .collect();
            prop_assert_eq!(bits(&want), bits(&y));
            for (a, b) in y.iter().zip(naive(&x, m, &w, n, k)) {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }

        #[test]
        fn widened_matmul_matches_f32(m in 1usize..9, n in 1usize..130, k in 1usize..40, seed: u64) {
            let x = vals(m * k, seed);
            let w16: Vec<half::f16> = vals(n * k, !seed).into_iter().map(half::f16::from_f32).collect();
            let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul_packed(&x, m, &Packed::from_rows(&w32, n, k), &mut a);
            matmul_packed(&x, m, &Packed::from_rows(&w16, n, k), &mut b);
            prop_assert_eq!(bits(&a), bits(&b));
            let wb: Vec<half::bf16> = w32.iter().map(|v| half::bf16::from_f32(*v)).collect();
            let wb32: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            matmul_packed(&x, m, &Packed::from_rows(&wb32, n, k), &mut a);
            matmul_packed(&x, m, &Packed::from_rows(&wb, n, k), &mut b);
            prop_assert_eq!(bits(&a), bits(&b));
            // The path quantized weights take: f32 panels written by a callback.
            let p32 = Packed::from_rows(&wb32, n, k);
            matmul_widened(&x, m, n, k, &mut b, |j, dst| dst.copy_from_slice(p32.panel(j)));
            prop_assert_eq!(bits(&a), bits(&b));
        }

        #[test]
        fn packing_round_trips(n in 1usize..150, k in 1usize..40, seed: u64) {
            let w = vals(n * k, seed);
            let p = Packed::from_rows(&w, n, k);
            prop_assert_eq!(p.to_rows(), w.clone());
            let mut row = vec![0f32; k];
            for j in 0..n {
                p.row_into(j, &mut row);
                prop_assert_eq!(&row[..], &w[j * k..(j + 1) * k]);
            }
        }

        #[test]
        fn stacking_equals_packing_the_stacked_rows(ns in proptest::collection::vec(1usize..140, 1..4), k in 1usize..20, seed: u64) {
            // Sizes that are whole panels take the copying path, others the repacking one.
            let ns: Vec<usize> = ns.into_iter().map(|n| if n > 100 { PANEL * (n % 3 + 1) } else { n }).collect();
            let rows: Vec<Vec<f32>> = ns.iter().enumerate().map(|(i, &n)| vals(n * k, seed ^ i as u64)).collect();
            let parts: Vec<Packed<f32>> = rows.iter().zip(&ns).map(|(r, &n)| Packed::from_rows(r, n, k)).collect();
            let stacked = Packed::stack(&parts.iter().collect::<Vec<_>>());
            let all: Vec<f32> = rows.concat();
            prop_assert_eq!(stacked, Packed::from_rows(&all, ns.iter().sum(), k));
        }
    }

    #[test]
    fn argmax_breaks_ties_low_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN, 0.7]), 3);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    /// Values drawn from a few levels (so ties are common), NaN, infinities and signed zeros, at
    /// lengths around the vector and unroll widths.
    fn argmax_input() -> impl Strategy<Value = Vec<f32>> {
        let value = prop_oneof![
            8 => (-3i32..3).prop_map(|v| v as f32),
            1 => Just(f32::NAN),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(f32::INFINITY),
            1 => Just(-0.0f32),
        ];
        proptest::collection::vec(value, 1..200)
    }

    proptest! {
        #[test]
        fn argmax_equals_the_reference(x in argmax_input()) {
            prop_assert_eq!(argmax(&x), argmax_reference(&x));
        }
    }

    #[test]
    fn argmax_of_a_vocabulary_row_equals_the_reference() {
        let mut x = crate::testing::test_values(49_152, 7);
        assert_eq!(argmax(&x), argmax_reference(&x));
        x[40_000] = 100.0;
        x[45_000] = 100.0;
        assert_eq!(argmax(&x), 40_000);
    }

    #[test]
    fn rms_norm_normalises_rows() {
        let mut x = vec![3.0f32, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        rms_norm(&mut x, &[1.0; 4], 0.0);
        let rms0 = (x[..4].iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms0 - 1.0).abs() < 1e-6);
        assert_eq!(&x[4..], &[1.0; 4]);
    }
}
