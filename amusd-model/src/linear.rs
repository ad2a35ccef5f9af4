//! [`Linear`]: the one type every weight matrix multiply in the model goes through.
//!
//! Keeping the storage choice behind one type lets faster kernels replace the current ones without
//! touching the model code. Whatever the storage, each output row is computed independently of the
//! others (see [`crate::kernels`]), which is what makes batched verification exact.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, GgmlType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::kernels::{self, Packed, Widen, PANEL};
use crate::qexact::{self, BlockPacked};
use crate::qkernels::{self, IntActivations, IntPacked};
use crate::ModelError;

/// How a weight matrix is stored. All variants hold `out_features` rows of `in_features` values.
#[derive(Clone)]
pub enum Weights {
    F32(Arc<Packed<f32>>),
    /// Widened to f32 in registers: the products have the bits of [`Weights::F32`] over the
    /// widened matrix.
    F16(Arc<Packed<half::f16>>),
    Bf16(Arc<Packed<half::bf16>>),
    /// GGUF blocks kept as stored, multiplied in f32 arithmetic: each weight is widened in
    /// registers to exactly its dequantized f32 value, so the products have the bits of
    /// [`Weights::F32`] over the dequantized matrix, at the stored size (see [`crate::qexact`]).
    Blocked(Arc<BlockPacked>),
    /// GGUF blocks kept as stored, multiplied with integer dot products against activations
    /// quantized to 8 bits per block (see [`crate::qkernels`]): the draft model's arithmetic.
    /// Batch-invariant like every other storage.
    Int(Arc<IntPacked>),
    /// A GGUF block-quantized matrix of a type without an integer kernel (the k-quants but q4_k
    /// and q5_k), multiplied by candle's kernels one activation row at a time.
    /// candle chooses a different algorithm for larger batches; running every row through the
    /// single-row path keeps the result batch-invariant.
    Quantized(Arc<QTensor>),
}

impl Weights {
    /// Whether products quantize the activations (integer arithmetic, a draft's), not f32.
    fn is_integer_arithmetic(&self) -> bool {
        matches!(self, Self::Int(_) | Self::Quantized(_))
    }
}

/// Whether a multiply must give every activation row the same bits whatever the batch size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Batching {
    /// Every row computed exactly as it would be alone: required of the verify model, whose argmax
    /// decides every committed token.
    #[default]
    Invariant,
    /// Block-quantized weights may take a faster path for large batches (dequantize four weight rows
    /// at a time and share them across the batch), which rounds differently from the one-row path.
    /// Fine for a draft model: its logits only choose proposals, the verify model decides.
    Throughput,
    /// The verify model's f32 arithmetic on the checkpoint's values, whatever the storage:
    /// integer panels of stored blocks are widened to exactly their f32 values
    /// ([`IntPacked::widen_panel`]) and multiplied as the f32 kernels do, so each output has the
    /// verify model's bits; a storage that cannot (candle's k-quants, coded scales) is an error.
    /// A draft model's matrices computing part of the verify model's prefill
    /// ([`crate::Llama::verify_twin`]).
    VerifyArithmetic,
}

/// Batches at least this large take the dequantizing path under [`Batching::Throughput`]. Measured
/// (q8_0, one core): a k-row forward costs 2.6x one row at k=4 and 4.2x at k=8 on the one-row path,
/// 1.6x and 2.1x of an f32 row on the dequantizing path, which starts from a slower single row; they
/// break even between 4 and 8. A 200-token prefill: 1273 ms one row at a time, 776 ms dequantizing.
const DEQUANT_MIN_ROWS: usize = 8;

/// A bias-free linear layer `y = x W^T`.
#[derive(Clone)]
pub struct Linear {
    weights: Weights,
    in_features: usize,
    out_features: usize,
    /// How [`Weights::Int`] takes its activations (8 bits unless set).
    int_acts: IntActivations,
}

impl Linear {
    pub fn new(
        weights: Weights,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self, ModelError> {
        let (rows, cols) = match &weights {
            Weights::F32(w) => (w.rows(), w.cols()),
            Weights::F16(w) => (w.rows(), w.cols()),
            Weights::Bf16(w) => (w.rows(), w.cols()),
            Weights::Blocked(w) => (w.rows(), w.cols()),
            Weights::Int(w) => (w.rows(), w.cols()),
            Weights::Quantized(q) => match q.shape().dims() {
                &[r, c] => (r, c),
                _ => (0, 0),
            },
        };
        if (rows, cols) != (out_features, in_features) {
            return Err(ModelError::Shape(format!(
                "linear weight is {rows}x{cols}, expected {out_features}x{in_features}"
            )));
        }
        Ok(Self {
            weights,
            in_features,
            out_features,
            int_acts: IntActivations::default(),
        })
    }

    /// How the integer kernels take this layer's activations, if its weights are
    /// [`Weights::Int`] (other storage multiplies f32 activations).
    pub fn set_int_activations(&mut self, acts: IntActivations) {
        self.int_acts = acts;
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// A short name of the storage type, e.g. `f32` or `q8_0`.
    pub fn storage_name(&self) -> String {
        match &self.weights {
            Weights::F32(_) => "f32".into(),
            Weights::F16(_) => "f16".into(),
            Weights::Bf16(_) => "bf16".into(),
            Weights::Blocked(w) => format!("f32[{:?}]", w.kind().ggml()).to_lowercase(),
            Weights::Int(w) => w.type_name().into(),
            Weights::Quantized(q) => format!("{:?}", q.dtype()).to_lowercase(),
        }
    }

    /// `y[m, out] = x[m, in] W^T`.
    pub fn forward(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [f32],
        batching: Batching,
    ) -> Result<(), ModelError> {
        let (n, k) = (self.out_features, self.in_features);
        debug_assert!(x.len() >= m * k && y.len() >= m * n);
        if batching == Batching::VerifyArithmetic && matches!(self.weights, Weights::Quantized(_)) {
            return Err(ModelError::Unsupported(format!(
                "{} weights cannot give the verify model's f32 values",
                self.storage_name()
            )));
        }
        match &self.weights {
            Weights::F32(w) => kernels::matmul_packed(x, m, w, y),
            Weights::F16(w) => kernels::matmul_packed(x, m, w, y),
            Weights::Bf16(w) => kernels::matmul_packed(x, m, w, y),
            Weights::Blocked(w) => qexact::matmul(x, m, w, y),
            Weights::Int(w) if batching == Batching::VerifyArithmetic => {
                if !w.widens_exactly() {
                    return Err(ModelError::Unsupported(format!(
                        "{} panels cannot give the verify model's f32 values",
                        w.type_name()
                    )));
                }
                kernels::matmul_widened(x, m, n, k, y, |b, dst| w.widen_panel(b, dst));
            }
            Weights::Int(w) => qkernels::matmul_int_with(self.int_acts, x, m, w, y),
            Weights::Quantized(q) => {
                let widen = match batching {
                    Batching::Throughput if m >= DEQUANT_MIN_ROWS => row_dequantizer(q.dtype()),
                    _ => None,
                };
                if let Some(widen) = widen {
                    let data = q.data()?;
                    let row_bytes = k / q.dtype().block_size() * q.dtype().type_size();
                    if data.len() < n * row_bytes {
                        return Err(ModelError::Shape(format!(
                            "quantized weight holds {} bytes, expected {}",
                            data.len(),
                            n * row_bytes
                        )));
                    }
                    // Quantized blocks run along a row, so dequantize a panel's rows, then lay them
                    // out reduction-major.
                    let mut rows = vec![0f32; PANEL * k];
                    kernels::matmul_widened(x, m, n, k, y, |b, panel| {
                        let first = b * PANEL;
                        let count = (n - first).min(PANEL);
                        for (c, row) in rows.chunks_exact_mut(k).take(count).enumerate() {
                            let j = first + c;
                            widen(&data[j * row_bytes..(j + 1) * row_bytes], row);
                        }
                        kernels::pack_panel(&rows[..count * k], k, panel);
                    });
                } else {
                    let mm = QMatMul::QTensor(q.clone());
                    for i in 0..m {
                        let xi = Tensor::from_slice(&x[i * k..(i + 1) * k], (1, k), &Device::Cpu)?;
                        let yi = mm.forward(&xi)?.flatten_all()?.to_vec1::<f32>()?;
                        y[i * n..(i + 1) * n].copy_from_slice(&yi);
                    }
                }
            }
        }
        Ok(())
    }

    /// Stacks layers with the same input width and storage into one whose outputs are the
    /// concatenation of theirs (Q, K and V; gate and up), so one pass over the input feeds all of them.
    /// Each output is computed exactly as it was in its own layer.
    pub fn concat(parts: &[Linear]) -> Result<Linear, ModelError> {
        let k = parts[0].in_features;
        if parts.iter().any(|p| p.in_features != k) {
            return Err(ModelError::Shape(
                "cannot fuse layers of different input widths".into(),
            ));
        }
        if parts
            .iter()
            .any(|p| p.storage_name() != parts[0].storage_name())
        {
            return match parts.iter().any(|p| p.weights.is_integer_arithmetic()) {
                true => concat_requantized(parts),
                false => concat_dense(parts),
            };
        }
        let n: usize = parts.iter().map(|p| p.out_features).sum();
        let weights = match &parts[0].weights {
            Weights::F32(_) => Weights::F32(Arc::new(concat_packed(parts, |w| match w {
                Weights::F32(v) => Some(v),
                _ => None,
            })?)),
            Weights::F16(_) => Weights::F16(Arc::new(concat_packed(parts, |w| match w {
                Weights::F16(v) => Some(v),
                _ => None,
            })?)),
            Weights::Bf16(_) => Weights::Bf16(Arc::new(concat_packed(parts, |w| match w {
                Weights::Bf16(v) => Some(v),
                _ => None,
            })?)),
            Weights::Blocked(_) => {
                let blocked = same_storage(parts, |w| match w {
                    Weights::Blocked(v) => Some(v),
                    _ => None,
                })?;
                Weights::Blocked(Arc::new(BlockPacked::stack(&blocked)?))
            }
            Weights::Int(_) => {
                let int = same_storage(parts, |w| match w {
                    Weights::Int(v) => Some(v),
                    _ => None,
                })?;
                Weights::Int(Arc::new(IntPacked::stack(&int)?))
            }
            Weights::Quantized(q0) => {
                let dtype = q0.dtype();
                let mut bytes = Vec::new();
                for p in parts {
                    match &p.weights {
                        Weights::Quantized(q) if q.dtype() == dtype => {
                            bytes.extend_from_slice(&q.data()?)
                        }
                        _ => {
                            return Err(ModelError::Shape(
                                "cannot fuse layers of different storage".into(),
                            ))
                        }
                    }
                }
                // GGUF blocks never straddle rows, so a row-wise concatenation of the raw blocks is the
                // quantized form of the stacked matrix.
                let storage = QStorage::from_data(bytes.into(), &Device::Cpu, dtype)?;
                Weights::Quantized(Arc::new(QTensor::new(storage, (n, k))?))
            }
        };
        let mut fused = Linear::new(weights, n, k)?;
        fused.int_acts = parts[0].int_acts;
        Ok(fused)
    }
}

impl Linear {
    /// Bytes of weights one forward reads: what bounds a one-token forward on memory bandwidth.
    pub fn bytes(&self) -> usize {
        match &self.weights {
            Weights::F32(w) => w.bytes(),
            Weights::F16(w) => w.bytes(),
            Weights::Bf16(w) => w.bytes(),
            Weights::Blocked(w) => w.bytes(),
            Weights::Int(w) => w.bytes(),
            Weights::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// Where the weights lie (start address, bytes), for [`crate::hugepages`]; `None` for
    /// candle's own storage.
    pub fn span(&self) -> Option<(usize, usize)> {
        match &self.weights {
            Weights::F32(w) => Some(w.span()),
            Weights::F16(w) => Some(w.span()),
            Weights::Bf16(w) => Some(w.span()),
            Weights::Blocked(w) => Some(w.span()),
            Weights::Int(w) => Some(w.span()),
            Weights::Quantized(_) => None,
        }
    }

    /// Writes weight row `ids[i]`, as f32, into the `i`-th `in_features`-wide row of `out`: the
    /// input embeddings of tokens, and a requantization's source values.
    pub fn rows_into(&self, ids: &[u32], out: &mut [f32]) -> Result<(), ModelError> {
        let k = self.in_features;
        if let Some(&j) = ids.iter().find(|&&j| j as usize >= self.out_features) {
            return Err(ModelError::Shape(format!(
                "row {j} of a {}-row matrix",
                self.out_features
            )));
        }
        let rows = out[..ids.len() * k].chunks_exact_mut(k).zip(ids);
        match &self.weights {
            Weights::F32(w) => rows.for_each(|(dst, &j)| w.row_into(j as usize, dst)),
            Weights::F16(w) => rows.for_each(|(dst, &j)| w.row_into(j as usize, dst)),
            Weights::Bf16(w) => rows.for_each(|(dst, &j)| w.row_into(j as usize, dst)),
            Weights::Blocked(w) => rows.for_each(|(dst, &j)| w.row_into(j as usize, dst)),
            Weights::Int(w) => rows.for_each(|(dst, &j)| w.row_into(j as usize, dst)),
            Weights::Quantized(q) => {
                let ids = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
                let x = q.embedding(&ids)?.flatten_all()?.to_vec1::<f32>()?;
                out[..x.len()].copy_from_slice(&x);
            }
        }
        Ok(())
    }

    /// The layer computing only the outputs `ids` (in that order), each exactly as this layer
    /// computes it: a draft's output head restricted to its most frequent tokens.
    pub fn select_rows(&self, ids: &[u32]) -> Result<Linear, ModelError> {
        let (n, k) = (self.out_features, self.in_features);
        if ids.is_empty() || ids.iter().any(|&j| j as usize >= n) {
            return Err(ModelError::Shape(format!(
                "cannot keep {} rows of {n}: ids must exist and be at least one",
                ids.len()
            )));
        }
        let weights = match &self.weights {
            Weights::F32(w) => Weights::F32(Arc::new(w.select_rows(ids))),
            Weights::F16(w) => Weights::F16(Arc::new(w.select_rows(ids))),
            Weights::Bf16(w) => Weights::Bf16(Arc::new(w.select_rows(ids))),
            Weights::Blocked(w) => Weights::Blocked(Arc::new(w.select_rows(ids))),
            Weights::Int(w) => Weights::Int(Arc::new(w.select_rows(ids))),
            Weights::Quantized(q) => {
                // GGUF blocks never straddle rows: each row is its own run of bytes.
                let data = q.data()?;
                let row = data.len() / n;
                let bytes: Vec<u8> = ids
                    .iter()
                    .flat_map(|&j| &data[j as usize * row..(j as usize + 1) * row])
                    .copied()
                    .collect();
                let storage = QStorage::from_data(bytes.into(), &Device::Cpu, q.dtype())?;
                Weights::Quantized(Arc::new(QTensor::new(storage, (ids.len(), k))?))
            }
        };
        let mut kept = Linear::new(weights, ids.len(), k)?;
        kept.int_acts = self.int_acts;
        Ok(kept)
    }
}

/// Dequantizes one weight row: GGUF blocks of type `B`, raw bytes in, `k` f32 values out.
fn dequantize_row<B: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    // SAFETY: every block type is a `#[repr(C)]` struct of integers and f16 values, valid for any bit
    // pattern; `align_to` only yields the part of `bytes` that is correctly aligned for `B`.
    let (head, blocks, tail) = unsafe { bytes.align_to::<B>() };
    // candle keeps CPU blocks in a `Vec<B>` and GGUF blocks never straddle rows, so a row's bytes are
    // always whole, aligned blocks.
    assert!(
        head.is_empty() && tail.is_empty(),
        "quantized row is not a whole number of aligned blocks"
    );
    B::to_float(blocks, out);
}

/// Writes one weight row, given as raw GGUF blocks, as f32 values.
type RowDequantizer = fn(&[u8], &mut [f32]);

/// The row dequantizer of a GGUF block type, if it is one.
fn row_dequantizer(dtype: GgmlDType) -> Option<RowDequantizer> {
    use candle_core::quantized::k_quants::*;
    Some(match dtype {
        GgmlDType::Q4_0 => dequantize_row::<BlockQ4_0>,
        GgmlDType::Q4_1 => dequantize_row::<BlockQ4_1>,
        GgmlDType::Q5_0 => dequantize_row::<BlockQ5_0>,
        GgmlDType::Q5_1 => dequantize_row::<BlockQ5_1>,
        GgmlDType::Q8_0 => dequantize_row::<BlockQ8_0>,
        GgmlDType::Q2K => dequantize_row::<BlockQ2K>,
        GgmlDType::Q3K => dequantize_row::<BlockQ3K>,
        GgmlDType::Q4K => dequantize_row::<BlockQ4K>,
        GgmlDType::Q5K => dequantize_row::<BlockQ5K>,
        GgmlDType::Q6K => dequantize_row::<BlockQ6K>,
        _ => return None,
    })
}

/// Parts stored in different types (a q4_k_m checkpoint keeps some layers' V projection in q6_k
/// beside q4_k Q and K) fused as the f32 values they stand for: what every exact storage's
/// products equal bit for bit, so a verify model's logits keep their bits.
fn concat_dense(parts: &[Linear]) -> Result<Linear, ModelError> {
    let (data, n, k) = stacked_rows(parts)?;
    Linear::new(weights_from_f32(data, n, k, WeightFormat::F32)?, n, k)
}

/// Parts of different storage of which some already take integer arithmetic (a q4_k_m draft's
/// q4_k Q and K beside a q6_k V) fused as q8_0 through the integer kernels: a draft's fused layer
/// at 8.5 bits a weight rather than f32's 32 (the values move by q8_0's rounding, which a draft's
/// arithmetic allows).
fn concat_requantized(parts: &[Linear]) -> Result<Linear, ModelError> {
    let (data, n, k) = stacked_rows(parts)?;
    let t = Tensor::from_vec(data, (n, k), &Device::Cpu)?;
    let q = QTensor::quantize(&t, GgmlDType::Q8_0)?;
    let w = IntPacked::from_ggml(GgmlDType::Q8_0, &q.data()?, n, k)?;
    Linear::new(Weights::Int(Arc::new(w)), n, k)
}

/// The parts' rows one after the other as f32: `[n, k]` row-major, `n` and `k`.
fn stacked_rows(parts: &[Linear]) -> Result<(Vec<f32>, usize, usize), ModelError> {
    let k = parts[0].in_features;
    let n: usize = parts.iter().map(|p| p.out_features).sum();
    let mut data = vec![0f32; n * k];
    let mut rows = data.as_mut_slice();
    for p in parts {
        let ids: Vec<u32> = (0..p.out_features as u32).collect();
        let (these, rest) = rows.split_at_mut(p.out_features * k);
        p.rows_into(&ids, these)?;
        rows = rest;
    }
    Ok((data, n, k))
}

fn concat_packed<T: Widen>(
    parts: &[Linear],
    get: impl Fn(&Weights) -> Option<&Arc<Packed<T>>>,
) -> Result<Packed<T>, ModelError> {
    Ok(Packed::stack(&same_storage(parts, get)?))
}

/// Every part's matrix of the storage `get` picks out; an error if a part is stored otherwise.
fn same_storage<'a, T>(
    parts: &'a [Linear],
    get: impl Fn(&'a Weights) -> Option<&'a Arc<T>>,
) -> Result<Vec<&'a T>, ModelError> {
    parts
        .iter()
        .map(|p| {
            get(&p.weights)
                .map(|w| &**w)
                .ok_or_else(|| ModelError::Shape("cannot fuse layers of different storage".into()))
        })
        .collect()
}

/// Converts a dense f32 matrix into the requested storage.
pub fn weights_from_f32(
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    format: WeightFormat,
) -> Result<Weights, ModelError> {
    Ok(match format {
        WeightFormat::F32 | WeightFormat::F32Dense => {
            Weights::F32(Arc::new(Packed::from_vec(data, rows, cols)))
        }
        WeightFormat::F16 => Weights::F16(Arc::new(Packed::from_vec(
            data.iter().map(|v| half::f16::from_f32(*v)).collect(),
            rows,
            cols,
        ))),
        WeightFormat::Bf16 => Weights::Bf16(Arc::new(Packed::from_vec(
            data.iter().map(|v| half::bf16::from_f32(*v)).collect(),
            rows,
            cols,
        ))),
        WeightFormat::Quantized(dtype) => {
            if !cols.is_multiple_of(dtype.block_size()) {
                return Err(ModelError::Unsupported(format!(
                    "cannot quantize a matrix with {cols} columns to {dtype:?} (block size {})",
                    dtype.block_size()
                )));
            }
            let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu)?;
            quantized_weights(QTensor::quantize(&t, dtype)?, false)?
        }
        WeightFormat::AsStored | WeightFormat::StoredS8 => {
            return Err(ModelError::Unsupported(
                "weight format 'as stored' needs a stored type".into(),
            ))
        }
    })
}

/// A block-quantized tensor as weights: the integer kernels where the type has them, candle's
/// otherwise. `coded_scales`: a q4_1 matrix's block scales coded to 8 bits
/// ([`IntPacked::with_coded_scales`]).
pub fn quantized_weights(t: QTensor, coded_scales: bool) -> Result<Weights, ModelError> {
    Ok(match t.shape().dims() {
        &[n, k] if IntPacked::supports(t.dtype()) => {
            let w = IntPacked::from_ggml(t.dtype(), &t.data()?, n, k)?;
            Weights::Int(Arc::new(
                match coded_scales && matches!(t.dtype(), GgmlDType::Q4_1 | GgmlDType::Q4K) {
                    true => w.with_coded_scales()?,
                    false => w,
                },
            ))
        }
        _ => Weights::Quantized(Arc::new(t)),
    })
}

/// How a model's matrices are run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Keep the file's own storage type.
    AsStored,
    /// As stored, but each q4_1 block's f16 scale and minimum coded to 8 bits against per-row
    /// factors (`q4_1s8`, [`IntPacked::with_coded_scales`]): the same nibbles, a tenth fewer bytes.
    /// Not the file's arithmetic, so for a draft.
    StoredS8,
    /// f32 arithmetic on the file's values. Block-quantized matrices stay as stored and are
    /// widened in registers ([`Weights::Blocked`]); the products are those of [`Self::F32Dense`].
    F32,
    /// Dequantized to f32 in memory at load: the same products as [`Self::F32`] at up to 5x the
    /// memory and bytes read per token; kept for side-by-side measurement.
    F32Dense,
    F16,
    Bf16,
    /// (Re)quantize to a GGUF block type at load time.
    Quantized(GgmlDType),
}

impl WeightFormat {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "stored" | "as-stored" | "native" => Self::AsStored,
            "stored-s8" => Self::StoredS8,
            "f32" => Self::F32,
            "f32-dense" => Self::F32Dense,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "q4_0" => Self::Quantized(GgmlDType::Q4_0),
            "q4_1" => Self::Quantized(GgmlDType::Q4_1),
            "q5_0" => Self::Quantized(GgmlDType::Q5_0),
            "q5_1" => Self::Quantized(GgmlDType::Q5_1),
            "q8_0" => Self::Quantized(GgmlDType::Q8_0),
            "q4_k" => Self::Quantized(GgmlDType::Q4K),
            "q5_k" => Self::Quantized(GgmlDType::Q5K),
            "q6_k" => Self::Quantized(GgmlDType::Q6K),
            _ => return None,
        })
    }

    pub const NAMES: &'static str =
        "stored, stored-s8, f32, f32-dense, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k";
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AsStored => f.write_str("stored"),
            Self::StoredS8 => f.write_str("stored-s8"),
            Self::F32 => f.write_str("f32"),
            Self::F32Dense => f.write_str("f32-dense"),
            Self::F16 => f.write_str("f16"),
            Self::Bf16 => f.write_str("bf16"),
            Self::Quantized(d) => write!(f, "{}", format!("{d:?}").to_lowercase()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lin(format: WeightFormat, n: usize, k: usize, seed: u32) -> Linear {
        let data: Vec<f32> = (0..n * k)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Linear::new(weights_from_f32(data, n, k, format).unwrap(), n, k).unwrap()
    }

    #[test]
    fn every_storage_is_batch_invariant_and_fuses_exactly() {
        for format in [
            WeightFormat::F32,
            WeightFormat::F16,
            WeightFormat::Bf16,
            WeightFormat::Quantized(GgmlDType::Q8_0),
            WeightFormat::Quantized(GgmlDType::Q4_1),
        ] {
            let (k, m) = (64, 7);
            let (a, b) = (lin(format, 12, k, 1), lin(format, 5, k, 2));
            let fused = Linear::concat(&[a.clone(), b.clone()]).unwrap();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
                .collect();
            let mut y = vec![0f32; m * 17];
            fused.forward(&x, m, &mut y, Batching::Invariant).unwrap();
            for i in 0..m {
                let (mut ya, mut yb) = (vec![0f32; 12], vec![0f32; 5]);
                a.forward(&x[i * k..(i + 1) * k], 1, &mut ya, Batching::Invariant)
                    .unwrap();
                b.forward(&x[i * k..(i + 1) * k], 1, &mut yb, Batching::Invariant)
                    .unwrap();
                ya.extend(yb);
                assert_eq!(ya, y[i * 17..(i + 1) * 17].to_vec(), "{format}");
            }
        }
    }

    /// A q4_k Q and K beside a q6_k V (as q4_k_m files have them) fuse, and the fused layer
    /// computes each part's outputs with their bits.
    #[test]
    fn parts_of_different_types_fuse_exactly() {
        let (k, m) = (256, 5);
        let part = |dtype, n, seed| {
            let (bytes, _) = crate::testing::quantized_matrix(dtype, n, k, seed);
            let w = BlockPacked::from_ggml(dtype, &bytes, n, k).unwrap();
            Linear::new(Weights::Blocked(Arc::new(w)), n, k).unwrap()
        };
        let parts = [
            part(GgmlDType::Q4K, 70, 1),
            part(GgmlDType::Q4K, 6, 2),
            part(GgmlDType::Q6K, 9, 3),
        ];
        let fused = Linear::concat(&parts).unwrap();
        assert_eq!(fused.storage_name(), "f32");
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
            .collect();
        let mut y = vec![0f32; m * 85];
        fused.forward(&x, m, &mut y, Batching::Invariant).unwrap();
        let mut want = vec![Vec::new(); m];
        for p in &parts {
            let mut yp = vec![0f32; m * p.out_features()];
            p.forward(&x, m, &mut yp, Batching::Invariant).unwrap();
            for (w, row) in want.iter_mut().zip(yp.chunks_exact(p.out_features())) {
                w.extend(row.iter().map(|v| v.to_bits()));
            }
        }
        let got: Vec<Vec<u32>> = (y.chunks_exact(85))
            .map(|r| r.iter().map(|v| v.to_bits()).collect())
            .collect();
        assert_eq!(got, want);
    }

    /// As stored (a draft's storage), a q4_k Q and K (integer kernels) beside a q6_k V (candle's)
    /// fuse as q8_0 rather than f32: each part's outputs within q8_0's rounding of its own.
    #[test]
    fn quantized_parts_of_different_types_fuse_as_q8_0() {
        let (k, m) = (256, 3);
        let part = |dtype, n, seed| {
            let (bytes, _) = crate::testing::quantized_matrix(dtype, n, k, seed);
            let t = QTensor::new(
                QStorage::from_data(std::borrow::Cow::Owned(bytes), &Device::Cpu, dtype).unwrap(),
                (n, k),
            )
            .unwrap();
            Linear::new(quantized_weights(t, false).unwrap(), n, k).unwrap()
        };
        let parts = [part(GgmlDType::Q4K, 40, 1), part(GgmlDType::Q6K, 24, 2)];
        assert_eq!(parts.each_ref().map(|p| p.storage_name()), ["q4_1", "q6k"]);
        let fused = Linear::concat(&parts).unwrap();
        assert_eq!(fused.storage_name(), "q8_0");
        let x = crate::testing::test_values(m * k, 5);
        let mut y = vec![0f32; m * 64];
        fused.forward(&x, m, &mut y, Batching::Invariant).unwrap();
        let mut off = 0;
        for p in &parts {
            let mut yp = vec![0f32; m * p.out_features()];
            p.forward(&x, m, &mut yp, Batching::Invariant).unwrap();
            for (i, row) in yp.chunks_exact(p.out_features()).enumerate() {
                for (j, want) in row.iter().enumerate() {
                    let got = y[i * 64 + off + j];
                    // Both quantize x to 8 bits; q8_0 moves each weight by at most 1/254 of its
                    // block's largest: a few hundredths over 256 products of values below 1.
                    assert!(
                        (got - want).abs() < 0.1,
                        "row {i} output {}: {got} vs {want}",
                        off + j
                    );
                }
            }
            off += p.out_features();
        }
    }

    #[test]
    fn selected_rows_compute_what_the_whole_layer_computes() {
        // 256 columns: a k-quant (candle's kernels) among the storages.
        let (n, k, m) = (150, 256, 3);
        let ids: Vec<u32> = [149, 0, 7, 64, 65, 3, 100, 128, 127]
            .into_iter()
            .chain(10..40)
            .collect();
        let keep = ids.len();
        let (bytes, _) = crate::testing::quantized_matrix(GgmlDType::Q4_1, n, k, 5);
        let blocked = Weights::Blocked(Arc::new(
            BlockPacked::from_ggml(GgmlDType::Q4_1, &bytes, n, k).unwrap(),
        ));
        let mut layers: Vec<Linear> = [
            WeightFormat::F32,
            WeightFormat::F16,
            WeightFormat::Bf16,
            WeightFormat::Quantized(GgmlDType::Q8_0),
            WeightFormat::Quantized(GgmlDType::Q4_1),
            WeightFormat::Quantized(GgmlDType::Q5_0),
            WeightFormat::Quantized(GgmlDType::Q6K),
        ]
        .into_iter()
        .map(|f| lin(f, n, k, 4))
        .collect();
        layers.push(Linear::new(blocked, n, k).unwrap());
        let x = crate::testing::test_values(m * k, 6);
        for full in layers {
            let head = full.select_rows(&ids).unwrap();
            assert_eq!(head.out_features(), keep);
            assert_eq!(head.storage_name(), full.storage_name());
            let (mut y_full, mut y_head) = (vec![0f32; m * n], vec![0f32; m * keep]);
            full.forward(&x, m, &mut y_full, Batching::Invariant)
                .unwrap();
            head.forward(&x, m, &mut y_head, Batching::Invariant)
                .unwrap();
            for i in 0..m {
                for (c, &j) in ids.iter().enumerate() {
                    assert_eq!(
                        y_head[i * keep + c].to_bits(),
                        y_full[i * n + j as usize].to_bits(),
                        "{} row {i} id {j}",
                        full.storage_name()
                    );
                }
            }
            assert!(full.select_rows(&[]).is_err() && full.select_rows(&[3, 150]).is_err());
        }
    }

    #[test]
    fn integer_kernels_take_the_types_they_support() {
        for (dtype, int) in [
            (GgmlDType::Q8_0, true),
            (GgmlDType::Q4_0, true),
            (GgmlDType::Q4_1, true),
            (GgmlDType::Q4K, true),
            (GgmlDType::Q5_0, true),
            (GgmlDType::Q5_1, true),
            (GgmlDType::Q5K, true),
            (GgmlDType::Q6K, false),
        ] {
            let q = lin(WeightFormat::Quantized(dtype), 9, 256, 3);
            assert_eq!(matches!(q.weights(), Weights::Int(_)), int, "{dtype:?}");
        }
    }

    #[test]
    fn throughput_batches_multiply_the_dequantized_weights() {
        // Under Throughput a large batch of a quantized layer multiplies the dequantized matrix with
        // the f32 kernel, exactly; small batches stay on the one-row path.
        let (n, k, m) = (9, 256, DEQUANT_MIN_ROWS + 1);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 53 % 97) as f32) / 48.0 - 1.0)
            .collect();
        // Types with integer kernels (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k) never take
        // candle's paths.
        for dtype in [GgmlDType::Q2K, GgmlDType::Q3K, GgmlDType::Q6K] {
            let q = lin(WeightFormat::Quantized(dtype), n, k, 3);
            let Weights::Quantized(qt) = q.weights() else {
                panic!("{dtype:?} did not quantize")
            };
            let dense: Vec<f32> = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let f = Linear::new(
                weights_from_f32(dense, n, k, WeightFormat::F32).unwrap(),
                n,
                k,
            )
            .unwrap();
            let (mut want, mut got) = (vec![0f32; m * n], vec![0f32; m * n]);
            f.forward(&x, m, &mut want, Batching::Invariant).unwrap();
            q.forward(&x, m, &mut got, Batching::Throughput).unwrap();
            assert_eq!(want, got, "{dtype:?}");

            let (mut one, mut alone) = (vec![0f32; n], vec![0f32; n]);
            q.forward(&x[..k], 1, &mut one, Batching::Throughput)
                .unwrap();
            q.forward(&x[..k], 1, &mut alone, Batching::Invariant)
                .unwrap();
            assert_eq!(
                one, alone,
                "{dtype:?}: a single row must keep the integer path"
            );
        }
    }
}
