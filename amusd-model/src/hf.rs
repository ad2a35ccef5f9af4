//! Loading Hugging Face Llama checkpoints: `config.json` plus `model.safetensors` or sharded
//! `model-*.safetensors` with `model.safetensors.index.json`.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use serde::Deserialize;

use crate::config::{llama3_freq_factors, LlamaConfig, RopeStyle};
use crate::linear::{weights_from_f32, Linear, WeightFormat};
use crate::llama::Llama;
use crate::weights::{assemble, check_len, Tensor, WeightSource};
use crate::ModelError;

/// The fields of `config.json` amusd reads.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Absent: the head is tied when the checkpoint has no `lm_head.weight` (as llama.cpp reads a
    /// GGUF without `output.weight`).
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f32 {
    1e-5
}
fn default_theta() -> f32 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl HfConfig {
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = crate::files::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            error: source,
        })?;
        serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
            path,
            reason: format!("invalid config.json: {e}"),
        })
    }

    pub fn to_llama(&self) -> Result<LlamaConfig, ModelError> {
        let is_llama = self.architectures.iter().any(|a| a == "LlamaForCausalLM")
            || self.model_type.as_deref() == Some("llama");
        if !is_llama {
            return Err(ModelError::Unsupported(format!(
                "architecture {:?} (model_type {:?}); amusd runs LlamaForCausalLM checkpoints",
                self.architectures, self.model_type
            )));
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let rope_freq_factors = match &self.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("");
                if kind != "llama3" {
                    return Err(ModelError::Unsupported(format!(
                        "rope_scaling type '{kind}' (only llama3 is supported)"
                    )));
                }
                let f = |k: &str| {
                    s.get(k)
                        .and_then(|v| v.as_f64())
                        .map(|v| v as f32)
                        .ok_or_else(|| ModelError::Config(format!("rope_scaling lacks '{k}'")))
                };
                Some(llama3_freq_factors(
                    head_dim,
                    self.rope_theta,
                    f("factor")?,
                    f("low_freq_factor")?,
                    f("high_freq_factor")?,
                    f("original_max_position_embeddings")?,
                ))
            }
        };
        let cfg = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_style: RopeStyle::Halves,
            rope_freq_factors,
            max_position: self.max_position_embeddings,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// End-of-sequence ids from `eos_token_id` (a number or a list), each a row of the
    /// embedding: an id past it would stop nothing (and one past `u32` was cut to a wrong one).
    pub fn eos_ids(&self) -> Result<Vec<u32>, ModelError> {
        let ids: Vec<u64> = match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().into_iter().collect(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).collect(),
            _ => Vec::new(),
        };
        ids.into_iter()
            .map(|id| match u32::try_from(id) {
                Ok(small) if (small as usize) < self.vocab_size => Ok(small),
                _ => Err(ModelError::Config(format!(
                    "config.json's eos_token_id {id} is not one of the {} token ids",
                    self.vocab_size
                ))),
            })
            .collect()
    }
}

/// The safetensors files of a checkpoint directory.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = crate::files::read_to_string(&index).map_err(|source| ModelError::Io {
            path: index.clone(),
            error: source,
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
                path: index.clone(),
                reason: format!("invalid index: {e}"),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Corrupt {
                path: index.clone(),
                reason: "no weight_map".into(),
            })?;
        let names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        // Shards lie beside the index: a name with a path in it could reach any file.
        if let Some(bad) = names.iter().find(|f| !is_plain_file_name(f)) {
            return Err(ModelError::Corrupt {
                path: index.clone(),
                reason: format!("the weight map names {bad:?}, not a file beside the index"),
            });
        }
        let mut files: Vec<PathBuf> = names.iter().map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        for f in &files {
            if !f.is_file() {
                return Err(ModelError::Io {
                    path: f.clone(),
                    error: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard named in the index is missing",
                    ),
                });
            }
        }
        return Ok(files);
    }
    Err(ModelError::NotAModel {
        path: dir.to_path_buf(),
        reason: "no model.safetensors or model.safetensors.index.json".into(),
    })
}

/// A name of a file in the same directory: no separator, not `.` or `..`.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\'])
}

/// Loads a Llama checkpoint directory, converting every matrix to `format` (`AsStored` keeps the
/// file's float type).
pub fn load_llama(dir: &Path, format: WeightFormat) -> Result<(Llama, HfConfig), ModelError> {
    let hf = HfConfig::read(dir)?;
    let cfg = hf.to_llama()?;
    let files = weight_files(dir)?;
    // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on nobody
    // truncating them while we read.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| ModelError::Corrupt {
        path: files[0].clone(),
        reason: format!(
            "bad safetensors: {}",
            crate::error::printable(&e.to_string())
        ),
    })?;
    let mut src = HfWeights {
        st,
        dir,
        format,
        tied: hf.tie_word_embeddings == Some(true),
    };
    if hf.tie_word_embeddings == Some(false) && !src.has(Tensor::Output) {
        // Tying anyway would run a different model than the config describes.
        return Err(ModelError::Config(
            "config.json says tie_word_embeddings is false, but the checkpoint has no \
             lm_head.weight"
                .into(),
        ));
    }
    Ok((assemble(cfg, &mut src)?, hf))
}

/// A safetensors checkpoint as a [`WeightSource`]: Hugging Face's tensor names.
struct HfWeights<'a> {
    st: MmapedSafetensors,
    dir: &'a Path,
    format: WeightFormat,
    tied: bool,
}

fn hf_name(t: Tensor) -> String {
    let layer = |i: usize, what: &str| format!("model.layers.{i}.{what}.weight");
    match t {
        Tensor::Embedding => "model.embed_tokens.weight".into(),
        Tensor::Output => "lm_head.weight".into(),
        Tensor::OutputNorm => "model.norm.weight".into(),
        Tensor::AttnNorm(i) => layer(i, "input_layernorm"),
        Tensor::Query(i) => layer(i, "self_attn.q_proj"),
        Tensor::Key(i) => layer(i, "self_attn.k_proj"),
        Tensor::Value(i) => layer(i, "self_attn.v_proj"),
        Tensor::AttnOutput(i) => layer(i, "self_attn.o_proj"),
        Tensor::FfnNorm(i) => layer(i, "post_attention_layernorm"),
        Tensor::Gate(i) => layer(i, "mlp.gate_proj"),
        Tensor::Up(i) => layer(i, "mlp.up_proj"),
        Tensor::Down(i) => layer(i, "mlp.down_proj"),
    }
}

impl HfWeights<'_> {
    fn load(&self, name: &str) -> Result<candle_core::Tensor, ModelError> {
        let view = self
            .st
            .get(name)
            .map_err(|_| ModelError::MissingTensor(name.to_string()))?;
        // Integer tensors would convert to floats without complaint: weights are floats or nothing.
        use safetensors::Dtype;
        if !matches!(
            view.dtype(),
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
        ) {
            return Err(ModelError::Unsupported(format!(
                "tensor '{name}' is {:?} in {}; amusd loads f32, f16, bf16 or f64 safetensors \
                 (quantized checkpoints: use a GGUF)",
                view.dtype(),
                self.dir.display()
            )));
        }
        self.st
            .load(name, &Device::Cpu)
            .map_err(|e| ModelError::Corrupt {
                path: self.dir.to_path_buf(),
                reason: format!("tensor '{name}': {e}"),
            })
    }
}

impl WeightSource for HfWeights<'_> {
    fn has(&self, t: Tensor) -> bool {
        self.st.get(&hf_name(t)).is_ok()
    }

    fn tied_output(&self) -> bool {
        self.tied
    }

    fn linear(&mut self, t: Tensor, rows: usize, cols: usize) -> Result<Linear, ModelError> {
        let name = hf_name(t);
        let t = self.load(&name)?;
        if t.dims() != [rows, cols] {
            return Err(ModelError::Shape(format!(
                "tensor '{name}' is {:?}, expected [{rows}, {cols}]",
                t.dims()
            )));
        }
        let format = match (self.format, t.dtype()) {
            (WeightFormat::AsStored | WeightFormat::StoredS8, DType::F16) => WeightFormat::F16,
            (WeightFormat::AsStored | WeightFormat::StoredS8, DType::BF16) => WeightFormat::Bf16,
            (WeightFormat::AsStored | WeightFormat::StoredS8, _) => WeightFormat::F32,
            (f, _) => f,
        };
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Linear::new(weights_from_f32(data, rows, cols, format)?, rows, cols)
    }

    fn vector(&mut self, t: Tensor, len: usize) -> Result<Vec<f32>, ModelError> {
        let name = hf_name(t);
        let v = self
            .load(&name)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        check_len(&name, v, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TinyModel;

    /// A tiny checkpoint in `dir` whose `config.json` went through `edit`.
    fn edited(dir: &Path, tiny: &TinyModel, edit: impl Fn(&mut serde_json::Value)) {
        tiny.write_hf(dir).unwrap();
        let path = dir.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut config);
        std::fs::write(path, config.to_string()).unwrap();
    }

    fn load_err(dir: &Path) -> String {
        let spec: crate::ModelSpec = dir.to_str().unwrap().parse().unwrap();
        match crate::loader::load(&spec) {
            Ok(_) => panic!("{} loaded", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_eos_id_outside_the_vocabulary_is_an_error_not_a_truncation() {
        // 2^40 + 258 was cut to 258 by `as u32`, a real id.
        for id in [(1u64 << 40) + 258, 999_999] {
            let dir = tempfile::tempdir().unwrap();
            edited(dir.path(), &TinyModel::default(), |c| {
                c["eos_token_id"] = id.into();
            });
            let err = load_err(dir.path());
            assert!(err.contains(&format!("eos_token_id {id}")), "{err}");
        }
    }

    #[test]
    fn a_tokenizer_without_tokens_is_an_error() {
        // It encoded every prompt as nothing: the text was dropped without a word.
        let dir = tempfile::tempdir().unwrap();
        let tiny = TinyModel::default();
        tiny.write_hf(dir.path()).unwrap();
        let mut json = tiny.tokenizer_json();
        json["model"]["vocab"] = serde_json::json!({});
        json["added_tokens"] = serde_json::json!([]);
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
        assert!(load_err(dir.path()).contains("the tokenizer has no tokens"));
    }

    #[test]
    fn an_untied_head_that_is_missing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        edited(dir.path(), &TinyModel::default(), |c| {
            c["tie_word_embeddings"] = false.into();
        });
        assert!(load_err(dir.path()).contains("no lm_head.weight"));
        // Without the key, a checkpoint without a head ties it (as llama.cpp reads a GGUF).
        let dir = tempfile::tempdir().unwrap();
        edited(dir.path(), &TinyModel::default(), |c| {
            c.as_object_mut().unwrap().remove("tie_word_embeddings");
        });
        let spec: crate::ModelSpec = dir.path().to_str().unwrap().parse().unwrap();
        crate::loader::load(&spec).unwrap();
    }

    #[test]
    fn an_index_naming_a_file_outside_the_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        TinyModel::default().write_hf(dir.path()).unwrap();
        std::fs::rename(
            dir.path().join("model.safetensors"),
            dir.path().join("model-00001-of-00001.safetensors"),
        )
        .unwrap();
        let index = |file: &str| {
            let map = serde_json::json!({"weight_map": {"model.embed_tokens.weight": file}});
            std::fs::write(
                dir.path().join("model.safetensors.index.json"),
                map.to_string(),
            )
            .unwrap();
        };
        index("model-00001-of-00001.safetensors");
        assert_eq!(weight_files(dir.path()).unwrap().len(), 1);
        for bad in [
            "/etc/passwd",
            "../model-00001-of-00001.safetensors",
            "..",
            "",
        ] {
            index(bad);
            let err = weight_files(dir.path()).unwrap_err().to_string();
            assert!(err.contains("not a file beside the index"), "{bad}: {err}");
        }
    }
}
