//! Tiny random-weight Llama checkpoints, written in both on-disk formats, for tests.
//!
//! The same weights are written as a Hugging Face directory (rotate-half rotary layout) and as a GGUF
//! file (Q and K rows permuted for interleaved rotation, as llama.cpp's converter does), so a test can
//! check both loaders and both rotary conventions against each other.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::ModelError;

/// The default model, for tests that need the real checkpoint. Panics with how to fetch it when it
/// is missing: such a test must fail, not pass without checking anything.
pub fn require_default_model() -> std::path::PathBuf {
    let path = crate::default_model_path();
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-assets.sh (scripts/test.sh does) before the tests",
        path.display()
    );
    path
}

pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Shape of a tiny model.
#[derive(Clone, Debug)]
pub struct TinyModel {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
    pub seed: u64,
    pub tie_embeddings: bool,
    /// Added to the vocabulary past the byte-level tokens and specials (lets a test make a model
    /// whose vocabulary differs from another's).
    pub extra_vocab: usize,
    /// Rows past the tokenizer's vocabulary in the embedding (and head), as checkpoints pad their
    /// vocabulary to a multiple of 64 or 128.
    pub padded_rows: usize,
    /// The GGUF's `tokenizer.ggml.pre` (`gpt2`, which amusd knows; anything else is approximated).
    pub pre_tokenizer: &'static str,
}

impl Default for TinyModel {
    fn default() -> Self {
        Self {
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            context: 512,
            seed: 7,
            tie_embeddings: true,
            extra_vocab: 0,
            padded_rows: 0,
            pre_tokenizer: "gpt2",
        }
    }
}

/// GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet).
pub fn byte_alphabet() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars = vec!['\0'; 256];
    for &b in &printable {
        chars[b as usize] = char::from_u32(b).unwrap_or('?');
    }
    let mut next = 256;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            chars[b as usize] = char::from_u32(next).unwrap_or('?');
            next += 1;
            printable.push(b);
        }
    }
    chars
}

impl TinyModel {
    pub fn vocab_tokens(&self) -> Vec<String> {
        let mut v: Vec<String> = byte_alphabet().into_iter().map(String::from).collect();
        v.extend(SPECIAL_TOKENS.iter().map(|s| s.to_string()));
        v.extend((0..self.extra_vocab).map(|i| format!("<extra_{i}>")));
        v
    }

    pub fn vocab_size(&self) -> usize {
        256 + SPECIAL_TOKENS.len() + self.extra_vocab
    }

    /// The embedding's rows: the vocabulary and its padding.
    pub fn embedding_rows(&self) -> usize {
        self.vocab_size() + self.padded_rows
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Weights by Hugging Face name, in HF layout.
    fn weights(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut state = self.seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        let mut rand = |n: usize, scale: f32, offset: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    offset + scale * ((state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0)
                })
                .collect()
        };
        let (h, ff, v, hd) = (
            self.hidden,
            self.intermediate,
            self.embedding_rows(),
            self.head_dim(),
        );
        let (q, kv) = (self.heads * hd, self.kv_heads * hd);
        let mut w = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![v, h],
            rand(v * h, 1.0, 0.0),
        )];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            let s = 1.0 / (h as f32).sqrt();
            w.push((
                format!("{p}.input_layernorm.weight"),
                vec![h],
                rand(h, 0.1, 1.0),
            ));
            w.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![q, h],
                rand(q * h, 2.0 * s, 0.0),
            ));
            w.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv, h],
                rand(kv * h, 2.0 * s, 0.0),
            ));
            w.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv, h],
                rand(kv * h, s, 0.0),
            ));
            w.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, q],
                rand(h * q, s, 0.0),
            ));
            w.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                rand(h, 0.1, 1.0),
            ));
            w.push((
                format!("{p}.mlp.gate_proj.weight"),
                vec![ff, h],
                rand(ff * h, s, 0.0),
            ));
            w.push((
                format!("{p}.mlp.up_proj.weight"),
                vec![ff, h],
                rand(ff * h, s, 0.0),
            ));
            w.push((
                format!("{p}.mlp.down_proj.weight"),
                vec![h, ff],
                rand(h * ff, 1.0 / (ff as f32).sqrt(), 0.0),
            ));
        }
        w.push(("model.norm.weight".into(), vec![h], rand(h, 0.1, 1.0)));
        if !self.tie_embeddings {
            w.push((
                "lm_head.weight".into(),
                vec![v, h],
                rand(v * h, 1.0 / (h as f32).sqrt(), 0.0),
            ));
        }
        w
    }

    /// Writes `config.json`, `model.safetensors`, `tokenizer.json` and `tokenizer_config.json`.
    pub fn write_hf(&self, dir: &Path) -> Result<(), ModelError> {
        let io = |source| ModelError::Io {
            path: dir.to_path_buf(),
            error: source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.embedding_rows(),
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": self.context,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": 257,
            "eos_token_id": 258,
            "torch_dtype": "float32",
        });
        std::fs::write(dir.join("config.json"), config.to_string()).map_err(io)?;
        let mut tensors = HashMap::new();
        for (name, shape, data) in self.weights() {
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
        std::fs::write(
            dir.join("tokenizer.json"),
            self.tokenizer_json().to_string(),
        )
        .map_err(io)?;
        let tok_config = serde_json::json!({
            "chat_template": CHATML_TEMPLATE,
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
        });
        std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).map_err(io)?;
        Ok(())
    }

    /// A byte-level BPE `tokenizer.json` with no merges: every byte is a token.
    pub fn tokenizer_json(&self) -> serde_json::Value {
        let tokens = self.vocab_tokens();
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .take(256)
            .enumerate()
            .map(|(i, t)| (t.clone(), i.into()))
            .collect();
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .enumerate()
            .skip(256)
            .map(|(i, t)| {
                serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": []}
        })
    }

    /// Writes the same model as a GGUF file with `dtype` matrices (norms stay f32).
    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) -> Result<(), ModelError> {
        self.write_gguf_typed(path, |_| dtype)
    }

    /// The model as a GGUF whose matrices have the types `dtype_of` gives their GGUF names
    /// (a q4_k_m file, say: q4_k but `attn_v` and `ffn_down` in q6_k).
    pub fn write_gguf_typed(
        &self,
        path: &Path,
        dtype_of: impl Fn(&str) -> GgmlDType,
    ) -> Result<(), ModelError> {
        let hd = self.head_dim();
        let rename = |hf: &str| -> String {
            if hf == "model.embed_tokens.weight" {
                return "token_embd.weight".into();
            }
            if hf == "model.norm.weight" {
                return "output_norm.weight".into();
            }
            if hf == "lm_head.weight" {
                return "output.weight".into();
            }
            let rest = hf.trim_start_matches("model.layers.");
            let (i, name) = rest.split_once('.').unwrap_or((rest, ""));
            let g = match name {
                "input_layernorm.weight" => "attn_norm",
                "self_attn.q_proj.weight" => "attn_q",
                "self_attn.k_proj.weight" => "attn_k",
                "self_attn.v_proj.weight" => "attn_v",
                "self_attn.o_proj.weight" => "attn_output",
                "post_attention_layernorm.weight" => "ffn_norm",
                "mlp.gate_proj.weight" => "ffn_gate",
                "mlp.up_proj.weight" => "ffn_up",
                _ => "ffn_down",
            };
            format!("blk.{i}.{g}.weight")
        };
        let mut tensors = Vec::new();
        for (name, shape, data) in self.weights() {
            let data = if name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight") {
                permute_for_interleaved(&data, shape[0], shape[1], hd)
            } else {
                data
            };
            let t = Tensor::from_vec(data, shape.clone(), &Device::Cpu)?;
            let name = rename(&name);
            let q = if shape.len() == 1 {
                QTensor::quantize(&t, GgmlDType::F32)?
            } else {
                QTensor::quantize(&t, dtype_of(&name))?
            };
            tensors.push((name, q));
        }
        let tokens = self.vocab_tokens();
        let types: Vec<Value> = (0..tokens.len())
            .map(|i| Value::I32(if i < 256 { 1 } else { 3 }))
            .collect();
        let md: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("general.name", Value::String("tiny".into())),
            ("llama.vocab_size", Value::U32(self.embedding_rows() as u32)),
            ("llama.context_length", Value::U32(self.context as u32)),
            ("llama.embedding_length", Value::U32(self.hidden as u32)),
            (
                "llama.feed_forward_length",
                Value::U32(self.intermediate as u32),
            ),
            ("llama.block_count", Value::U32(self.layers as u32)),
            ("llama.attention.head_count", Value::U32(self.heads as u32)),
            (
                "llama.attention.head_count_kv",
                Value::U32(self.kv_heads as u32),
            ),
            ("llama.rope.dimension_count", Value::U32(hd as u32)),
            ("llama.rope.freq_base", Value::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            (
                "tokenizer.ggml.pre",
                Value::String(self.pre_tokenizer.into()),
            ),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.merges", Value::Array(Vec::new())),
            ("tokenizer.ggml.bos_token_id", Value::U32(257)),
            ("tokenizer.ggml.eos_token_id", Value::U32(258)),
            (
                "tokenizer.chat_template",
                Value::String(CHATML_TEMPLATE.into()),
            ),
        ];
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            error: source,
        })?;
        gguf_file::write(&mut f, &md_refs, &t_refs)?;
        Ok(())
    }
}

/// Reorders the rows of each head from rotate-half pairs `(i, i + d/2)` to interleaved pairs
/// `(2i, 2i + 1)`, as llama.cpp's converter does for Q and K.
pub fn permute_for_interleaved(w: &[f32], rows: usize, cols: usize, head_dim: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for head in 0..rows / head_dim {
        for i in 0..half {
            for j in 0..2 {
                let dst = head * head_dim + 2 * i + j;
                let src = head * head_dim + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// `len` values in [-1, 1) from a fixed LCG: test inputs that are the same on every platform.
pub fn test_values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A `[n, k]` matrix of [`test_values`] quantized by candle to `dtype`: its GGUF bytes and candle's
/// dequantization of them.
pub fn quantized_matrix(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let t = Tensor::from_vec(test_values(n * k, seed), (n, k), &Device::Cpu).expect("tensor");
    let q = QTensor::quantize(&t, dtype).expect("quantize");
    let dense = q
        .dequantize(&Device::Cpu)
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.to_vec1())
        .expect("dequantize");
    (q.data().expect("blocks").to_vec(), dense)
}
