//! Loading Llama-architecture GGUF files.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::config::{LlamaConfig, RopeStyle};
use crate::linear::{quantized_weights, weights_from_f32, Linear, WeightFormat, Weights};
use crate::llama::Llama;
use crate::qexact::{BlockKind, BlockPacked};
use crate::weights::{assemble, check_len, Tensor, WeightSource};
use crate::ModelError;

/// An open GGUF file: its header (metadata and tensor directory) and a reader for tensor data.
pub struct GgufFile {
    pub content: Content,
    reader: Tracked<BufReader<File>>,
    path: std::path::PathBuf,
}

/// A reader that knows its position. candle's header parser asks for the position before every
/// string (to check its length against the bytes left), and `BufReader` answers that with a
/// system call: 100 000 of them for SmolLM2's vocabulary and merges, ~15% of loading the model.
struct Tracked<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Seek> Seek for Tracked<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }

    fn stream_position(&mut self) -> std::io::Result<u64> {
        Ok(self.pos)
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            error: source,
        };
        let file = crate::files::open(path).map_err(io)?;
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        let got = read_up_to(&mut reader, &mut magic).map_err(io)?;
        if got < 4 || &magic != b"GGUF" {
            return Err(ModelError::NotAModel {
                path: path.to_path_buf(),
                reason: "no GGUF magic at the start of the file".into(),
            });
        }
        reader.rewind().map_err(io)?;
        crate::gguf_header::check(&mut reader).map_err(|e| header_error(path, e))?;
        reader.rewind().map_err(io)?;
        let mut reader = Tracked {
            inner: reader,
            pos: 0,
        };
        let content = Content::read(&mut reader).map_err(|e| {
            let msg = crate::error::printable(&e.to_string());
            // candle's words for a tensor type id it does not know: the file may be sound, only
            // newer than candle, so "corrupt, fetch it again" would send the user the wrong way.
            match msg.strip_prefix("unknown dtype for tensor ") {
                Some(id) => ModelError::Unsupported(format!(
                    "{}: a tensor is stored as GGML type {id}, which amusd cannot read; \
                     convert the model to f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 or a k-quant",
                    path.display()
                )),
                None => ModelError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("bad GGUF header: {msg}"),
                },
            }
        })?;
        Ok(Self {
            content,
            reader,
            path: path.to_path_buf(),
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The vocabulary's token strings in id order (`tokenizer.ggml.tokens`); empty when the file
    /// has none.
    pub fn token_strings(&self) -> Vec<&str> {
        let Some(Ok(values)) = self
            .metadata()
            .get("tokenizer.ggml.tokens")
            .map(Value::to_vec)
        else {
            return Vec::new();
        };
        values
            .iter()
            .map(|v| v.to_string().map_or("", |s| s.as_str()))
            .collect()
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads one tensor as stored.
    pub fn tensor(&mut self, name: &str) -> Result<QTensor, ModelError> {
        if !self.has_tensor(name) {
            return Err(ModelError::MissingTensor(name.to_string()));
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| ModelError::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "tensor '{}': {}",
                    name.escape_default(),
                    crate::error::printable(&e.to_string())
                ),
            })
    }

    fn tensor_f32(&mut self, name: &str) -> Result<Vec<f32>, ModelError> {
        let t = self.tensor(name)?;
        Ok(t.dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// The vocabulary size as the embedding matrix's row count, for files whose metadata lacks it.
    fn embedding_rows(&self) -> Result<usize, ModelError> {
        let name = "token_embd.weight";
        let t = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        match t.shape.dims() {
            &[rows, _] => Ok(rows),
            dims => Err(ModelError::Shape(format!(
                "tensor '{name}' is {dims:?}, expected [vocabulary, hidden]"
            ))),
        }
    }

    /// Reads a matrix and converts it to `format`, checking it is `rows x cols`.
    fn linear(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        format: WeightFormat,
    ) -> Result<Linear, ModelError> {
        let t = self.tensor(name)?;
        let dims = t.shape().dims().to_vec();
        if dims != [rows, cols] {
            return Err(ModelError::Shape(format!(
                "tensor '{name}' is {dims:?}, expected [{rows}, {cols}]"
            )));
        }
        let stored = t.dtype();
        let weights = match (format, stored) {
            (WeightFormat::AsStored | WeightFormat::StoredS8, GgmlDType::F32) => {
                weights_from_f32(self.dequant(&t)?, rows, cols, WeightFormat::F32)?
            }
            (WeightFormat::AsStored | WeightFormat::StoredS8, GgmlDType::F16) => {
                weights_from_f32(self.dequant(&t)?, rows, cols, WeightFormat::F16)?
            }
            (WeightFormat::AsStored | WeightFormat::StoredS8, GgmlDType::BF16) => {
                weights_from_f32(self.dequant(&t)?, rows, cols, WeightFormat::Bf16)?
            }
            (WeightFormat::AsStored, _) => quantized_weights(t, false)?,
            (WeightFormat::StoredS8, _) => quantized_weights(t, true)?,
            // f32 arithmetic on the checkpoint's values: widened in registers, never expanded.
            (WeightFormat::F32, have) if BlockKind::from_ggml(have).is_some() => Weights::Blocked(
                Arc::new(BlockPacked::from_ggml(have, &t.data()?, rows, cols)?),
            ),
            (WeightFormat::Quantized(want), have) if want == have => quantized_weights(t, false)?,
            (other, _) => weights_from_f32(self.dequant(&t)?, rows, cols, other)?,
        };
        Linear::new(weights, rows, cols)
    }

    fn dequant(&self, t: &QTensor) -> Result<Vec<f32>, ModelError> {
        Ok(t.dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// The model's hyperparameters from `llama.*` metadata.
    pub fn config(&mut self) -> Result<LlamaConfig, ModelError> {
        let md = &self.content.metadata;
        let arch = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(ModelError::Unsupported(format!(
                "architecture '{arch}' in {}; amusd runs Llama-family models (general.architecture = llama)",
                self.path.display()
            )));
        }
        let get = |k: &str| meta_usize(md, &format!("llama.{k}"));
        let n_heads = get("attention.head_count")?;
        let hidden_size = get("embedding_length")?;
        let head_dim = meta_usize_opt(md, "llama.rope.dimension_count")?
            .unwrap_or(hidden_size / n_heads.max(1));
        let vocab_size = match meta_usize_opt(md, "llama.vocab_size")? {
            Some(v) => v,
            None => self.embedding_rows()?,
        };
        let opt = |k: &str| meta_usize_opt(md, &format!("llama.{k}"));
        let mut cfg = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: get("feed_forward_length")?,
            n_layers: get("block_count")?,
            n_heads,
            n_kv_heads: opt("attention.head_count_kv")?.unwrap_or(n_heads),
            head_dim,
            rms_eps: meta_f32(md, "llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: meta_f32(md, "llama.rope.freq_base")?.unwrap_or(10_000.0),
            rope_style: RopeStyle::Interleaved,
            rope_freq_factors: None,
            max_position: opt("context_length")?.unwrap_or(4096),
        };
        if self.has_tensor("rope_freqs.weight") {
            cfg.rope_freq_factors = Some(self.tensor_f32("rope_freqs.weight")?);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Builds the model, converting every matrix to `format`.
    pub fn load_llama(&mut self, format: WeightFormat) -> Result<Llama, ModelError> {
        let cfg = self.config()?;
        assemble(cfg, &mut GgufWeights { file: self, format })
    }
}

/// A GGUF file as a [`WeightSource`]: llama.cpp's tensor names.
struct GgufWeights<'a> {
    file: &'a mut GgufFile,
    format: WeightFormat,
}

fn gguf_name(t: Tensor) -> String {
    let layer = |i: usize, what: &str| format!("blk.{i}.{what}.weight");
    match t {
        Tensor::Embedding => "token_embd.weight".into(),
        Tensor::Output => "output.weight".into(),
        Tensor::OutputNorm => "output_norm.weight".into(),
        Tensor::AttnNorm(i) => layer(i, "attn_norm"),
        Tensor::Query(i) => layer(i, "attn_q"),
        Tensor::Key(i) => layer(i, "attn_k"),
        Tensor::Value(i) => layer(i, "attn_v"),
        Tensor::AttnOutput(i) => layer(i, "attn_output"),
        Tensor::FfnNorm(i) => layer(i, "ffn_norm"),
        Tensor::Gate(i) => layer(i, "ffn_gate"),
        Tensor::Up(i) => layer(i, "ffn_up"),
        Tensor::Down(i) => layer(i, "ffn_down"),
    }
}

impl WeightSource for GgufWeights<'_> {
    fn has(&self, t: Tensor) -> bool {
        self.file.has_tensor(&gguf_name(t))
    }

    /// A GGUF file without `output.weight` ties it; one with it does not.
    fn tied_output(&self) -> bool {
        false
    }

    fn linear(&mut self, t: Tensor, rows: usize, cols: usize) -> Result<Linear, ModelError> {
        self.file.linear(&gguf_name(t), rows, cols, self.format)
    }

    fn vector(&mut self, t: Tensor, len: usize) -> Result<Vec<f32>, ModelError> {
        let name = gguf_name(t);
        check_len(&name, self.file.tensor_f32(&name)?, len)
    }
}

/// A header [`crate::gguf_header::check`] refused, as the error the user sees.
fn header_error(path: &Path, e: crate::gguf_header::HeaderError) -> ModelError {
    use crate::gguf_header::HeaderError;
    match e {
        HeaderError::Version(v) => ModelError::Unsupported(format!(
            "{} is GGUF version {v}; amusd reads versions 1 to 3",
            path.display()
        )),
        HeaderError::Malformed(reason) => ModelError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("bad GGUF header: {reason}"),
        },
        HeaderError::Io(error) => ModelError::Io {
            path: path.to_path_buf(),
            error,
        },
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// An integer metadata value of any GGUF integer type.
pub fn meta_usize(md: &HashMap<String, Value>, key: &str) -> Result<usize, ModelError> {
    let v = md
        .get(key)
        .ok_or_else(|| ModelError::Config(format!("GGUF metadata lacks '{key}'")))?;
    let n: Option<u64> = match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    };
    n.and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n < (1 << 40))
        .ok_or_else(|| {
            ModelError::Config(format!(
                "GGUF metadata '{key}' is not a sensible integer: {}",
                describe_value(v)
            ))
        })
}

/// An optional integer: `Ok(None)` when absent, an error when present but not an integer (a
/// default in its place would run the model with the wrong shape).
fn meta_usize_opt(md: &HashMap<String, Value>, key: &str) -> Result<Option<usize>, ModelError> {
    match md.contains_key(key) {
        true => meta_usize(md, key).map(Some),
        false => Ok(None),
    }
}

/// An optional float: `Ok(None)` when absent, an error when present but not a float.
fn meta_f32(md: &HashMap<String, Value>, key: &str) -> Result<Option<f32>, ModelError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::F32(x)) => Ok(Some(*x)),
        Some(Value::F64(x)) => Ok(Some(*x as f32)),
        Some(v) => Err(ModelError::Config(format!(
            "GGUF metadata '{key}' is not a number: {}",
            describe_value(v)
        ))),
    }
}

/// A metadata value in a few words for an error message: an array by its length, a string cut
/// short (a corrupt file's value may be megabytes).
pub(crate) fn describe_value(v: &Value) -> String {
    match v {
        Value::Array(items) => format!("an array of {} values", items.len()),
        Value::String(s) if s.chars().count() > 40 => {
            let head: String = s.chars().take(40).collect();
            format!("the string {:?}...", head)
        }
        v => format!("{v:?}"),
    }
}

/// Checks that `bytes` bytes are the row-major blocks of an `[n, k]` matrix of `dtype`, whose
/// blocks hold `block_values` values in `block_bytes` bytes: what the kernels that repack stored
/// blocks (`qexact`, `qkernels`) rely on.
pub(crate) fn check_block_matrix(
    dtype: GgmlDType,
    bytes: usize,
    n: usize,
    k: usize,
    block_values: usize,
    block_bytes: usize,
) -> Result<(), ModelError> {
    if !k.is_multiple_of(block_values) {
        return Err(ModelError::Shape(format!(
            "{dtype:?} matrix with {k} columns is not whole blocks of {block_values}"
        )));
    }
    let want = n * (k / block_values) * block_bytes;
    if bytes != want {
        return Err(ModelError::Shape(format!(
            "{dtype:?} {n}x{k} matrix holds {bytes} bytes, expected {want}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TinyModel;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn tiny_bytes() -> &'static [u8] {
        static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
        BYTES.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("t.gguf");
            let tiny = TinyModel {
                layers: 1,
                ..Default::default()
            };
            tiny.write_gguf(&p, GgmlDType::Q8_0).unwrap();
            std::fs::read(p).unwrap()
        })
    }

    /// Opening and loading must fail cleanly, never panic, whatever the bytes.
    fn try_load(bytes: &[u8]) -> Result<(), ModelError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, bytes).unwrap();
        let mut g = GgufFile::open(&p)?;
        g.load_llama(WeightFormat::AsStored).map(|_| ())
    }

    #[test]
    fn the_tiny_file_loads() {
        try_load(tiny_bytes()).unwrap();
    }

    /// Whether the tiny file's metadata has `key` (so a test that changes it changes something).
    fn tiny_has(key: &str) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("t.gguf");
        std::fs::write(&src, tiny_bytes()).unwrap();
        GgufFile::open(&src)
            .unwrap()
            .content
            .metadata
            .contains_key(key)
    }

    /// The tiny file written again as `bad.gguf` in `dir`, each metadata value through `meta`
    /// (`None` drops the key) and each tensor through `tensor`.
    fn rewritten(
        dir: &Path,
        meta: impl Fn(&str, &Value) -> Option<Value>,
        tensor: impl Fn(&str, QTensor) -> QTensor,
    ) -> std::path::PathBuf {
        rewritten_with(dir, meta, None, tensor)
    }

    /// [`rewritten`], with the key and value `extra` added.
    fn rewritten_with(
        dir: &Path,
        meta: impl Fn(&str, &Value) -> Option<Value>,
        extra: Option<(&str, Value)>,
        tensor: impl Fn(&str, QTensor) -> QTensor,
    ) -> std::path::PathBuf {
        let src = dir.join("t.gguf");
        std::fs::write(&src, tiny_bytes()).unwrap();
        let mut g = GgufFile::open(&src).unwrap();
        let names: Vec<String> = g.content.tensor_infos.keys().cloned().collect();
        let tensors: Vec<(String, QTensor)> = names
            .into_iter()
            .map(|n| {
                let t = tensor(&n, g.tensor(&n).unwrap());
                (n, t)
            })
            .collect();
        let metadata: Vec<(String, Value)> = g
            .content
            .metadata
            .iter()
            .filter_map(|(k, v)| meta(k, v).map(|v| (k.clone(), v)))
            .chain(extra.map(|(k, v)| (k.to_string(), v)))
            .collect();
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let bad = dir.join("bad.gguf");
        let mut f = File::create(&bad).unwrap();
        candle_core::quantized::gguf_file::write(&mut f, &metadata, &tensors).unwrap();
        bad
    }

    #[test]
    fn an_embedding_that_is_not_a_matrix_is_an_error_when_the_vocabulary_size_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(tiny_has("llama.vocab_size"));
        let bad = rewritten(
            dir.path(),
            |k, v| (k != "llama.vocab_size").then(|| v.clone()),
            |n, t| {
                if n != "token_embd.weight" {
                    return t;
                }
                // A vector: candle writes no 0-d tensor, and `[rows, _]` rejects both alike (the
                // old `dims()[0]` panicked on a 0-d one and took a vector's length as the vocabulary).
                let vector = candle_core::Tensor::zeros(8, candle_core::DType::F32, &Device::Cpu);
                QTensor::quantize(&vector.unwrap(), GgmlDType::F32).unwrap()
            },
        );
        let err = GgufFile::open(&bad).unwrap().config().unwrap_err();
        assert!(err.to_string().contains("token_embd.weight"), "{err}");
    }

    #[test]
    fn an_absurd_layer_count_is_a_missing_tensor_not_an_allocation() {
        // Found by `corrupted_files_fail_cleanly`: a flipped byte of the block count sized a
        // vector of layers (286 GB) before any layer's tensors were looked for.
        let dir = tempfile::tempdir().unwrap();
        assert!(tiny_has("llama.block_count"));
        let bad = rewritten(
            dir.path(),
            |k, v| {
                Some(if k == "llama.block_count" {
                    Value::U32(u32::MAX)
                } else {
                    v.clone()
                })
            },
            |_, t| t,
        );
        let err = GgufFile::open(&bad)
            .and_then(|mut g| g.load_llama(WeightFormat::AsStored))
            .err()
            .expect("a file with one layer's tensors and a count of 2^32 - 1 does not load");
        assert!(err.to_string().contains("blk.1"), "{err}");
    }

    /// The tiny file with metadata `key` set to `value`.
    fn with_meta(dir: &Path, key: &str, value: Value) -> std::path::PathBuf {
        let others = |k: &str, v: &Value| (k != key).then(|| v.clone());
        rewritten_with(dir, others, Some((key, value)), |_, t| t)
    }

    fn open_err(path: &Path) -> String {
        match GgufFile::open(path).and_then(|mut g| g.config()) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_alignment_that_is_not_a_power_of_two_is_an_error_not_a_panic() {
        // candle divides by the alignment: 0 panicked (found by a robustness pass).
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            Value::U32(0),
            Value::U32(48),
            Value::I32(-32),
            Value::String("32".into()),
        ] {
            let err = open_err(&with_meta(dir.path(), "general.alignment", bad));
            assert!(err.contains("general.alignment"), "{err}");
        }
        let fine = with_meta(dir.path(), "general.alignment", Value::U32(32));
        GgufFile::open(&fine)
            .unwrap()
            .load_llama(WeightFormat::AsStored)
            .unwrap();
    }

    #[test]
    fn metadata_arrays_past_the_bound_are_refused_before_candle_expands_them() {
        // Each element of an array becomes a 32-byte value in candle: a 200 MB array of bytes
        // asked for 8 GB.
        let dir = tempfile::tempdir().unwrap();
        let n = crate::gguf_header::MAX_ARRAY_ELEMENTS as usize + 1;
        let junk = Value::Array(vec![Value::U8(7); n]);
        let err = open_err(&with_meta(dir.path(), "junk", junk));
        assert!(err.contains("more than 8388608 elements"), "{err}");
        let fine = Value::Array(vec![Value::U8(7); 1000]);
        GgufFile::open(&with_meta(dir.path(), "junk", fine)).unwrap();
    }

    #[test]
    fn a_key_named_twice_or_a_misaligned_tensor_is_refused() {
        // candle kept the last of two keys (a second block count of 2 ran two layers of
        // gibberish) and read tensors at any offset (garbage); llama.cpp refuses both.
        let bytes = tiny_bytes();
        // Rename block_count (its length prefix too) to a second embedding_length.
        let (key, other): (&[u8], &[u8]) = (b"llama.block_count", b"llama.embedding_length");
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
        let mut twice = bytes[..at - 8].to_vec();
        twice.extend_from_slice(&(other.len() as u64).to_le_bytes());
        twice.extend_from_slice(other);
        twice.extend_from_slice(&bytes[at + key.len()..]);
        let err = try_load(&twice).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("t.gguf");
        std::fs::write(&src, bytes).unwrap();
        let g = GgufFile::open(&src).unwrap();
        let (name, info) = g
            .content
            .tensor_infos
            .iter()
            .find(|(_, t)| t.offset > 0)
            .unwrap();
        let name = name.as_bytes();
        let at = bytes.windows(name.len()).rposition(|w| w == name).unwrap();
        // After the name: dimension count, dimensions, type, then the offset.
        let dims = u32::from_le_bytes(bytes[at + name.len()..][..4].try_into().unwrap()) as usize;
        let off = at + name.len() + 4 + 8 * dims + 4;
        assert_eq!(
            u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap()),
            info.offset
        );
        let mut misaligned = bytes.to_vec();
        misaligned[off..off + 8].copy_from_slice(&(info.offset + 1).to_le_bytes());
        let err = try_load(&misaligned).unwrap_err().to_string();
        assert!(err.contains("not a multiple of the alignment 32"), "{err}");
    }

    #[test]
    fn a_norm_weight_that_is_not_finite_is_an_error() {
        // The model ran and answered nothing (every logit NaN).
        for bad in [f32::NAN, f32::INFINITY] {
            let dir = tempfile::tempdir().unwrap();
            let path = rewritten(
                dir.path(),
                |_, v| Some(v.clone()),
                |n, t| {
                    if n != "blk.0.attn_norm.weight" {
                        return t;
                    }
                    let mut v = t
                        .dequantize(&Device::Cpu)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    v[3] = bad;
                    let len = v.len();
                    let t = candle_core::Tensor::from_vec(v, len, &Device::Cpu).unwrap();
                    QTensor::quantize(&t, GgmlDType::F32).unwrap()
                },
            );
            let err = GgufFile::open(&path)
                .and_then(|mut g| g.load_llama(WeightFormat::AsStored))
                .err()
                .expect("a NaN norm loads");
            assert!(err.to_string().contains("blk.0.attn_norm.weight"), "{err}");
        }
    }

    #[test]
    fn an_unknown_version_says_so() {
        let mut b = tiny_bytes().to_vec();
        b[4..8].copy_from_slice(&4u32.to_le_bytes());
        let err = try_load(&b).unwrap_err().to_string();
        assert!(
            err.contains("GGUF version 4; amusd reads versions 1 to 3"),
            "{err}"
        );
        assert!(!err.contains("fetch it again"), "{err}");
    }

    #[test]
    fn metadata_of_the_wrong_type_is_an_error_and_a_short_one() {
        // A string base frequency ran the model with the default 10000 (SmolLM2's is 100000).
        let dir = tempfile::tempdir().unwrap();
        let text = Value::String("100000".into());
        let err = open_err(&with_meta(dir.path(), "llama.rope.freq_base", text));
        assert!(
            err.contains("llama.rope.freq_base") && err.contains("not a number"),
            "{err}"
        );
        // An array where a count belongs was printed whole (a megabyte for a vocabulary).
        let tokens = Value::Array(vec![Value::String("token".into()); 50_000]);
        let err = open_err(&with_meta(dir.path(), "llama.block_count", tokens));
        assert!(
            err.contains("an array of 50000 values") && err.len() < 200,
            "{err}"
        );
    }

    #[test]
    fn absurd_counts_are_refused() {
        let mut b = tiny_bytes().to_vec();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(try_load(&b).is_err());
        let mut b = tiny_bytes().to_vec();
        b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(try_load(&b).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn corrupted_files_fail_cleanly(cut in 0usize..100_000, flips in proptest::collection::vec((0usize..4096, any::<u8>()), 0..8)) {
            let mut b = tiny_bytes().to_vec();
            for (pos, v) in flips {
                let i = pos % b.len();
                b[i] = v;
            }
            b.truncate(cut.min(b.len()));
            let _ = try_load(&b);
        }

        #[test]
        fn random_bytes_fail_cleanly(mut b in proptest::collection::vec(any::<u8>(), 0..2048), gguf_magic: bool) {
            if gguf_magic && b.len() >= 4 {
                b[..4].copy_from_slice(b"GGUF");
            }
            prop_assert!(try_load(&b).is_err());
        }
    }
}
