//! Hyperparameters of a Llama-family model, from GGUF metadata or a Hugging Face `config.json`.

use crate::ModelError;

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGUF files store Q and K permuted for this (llama.cpp's "normal" rope).
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face checkpoints ("rotate half").
    Halves,
}

#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// Per-frequency divisors (Llama 3.1's long-context scaling), one per rotated pair, if any.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// The context the model was trained for; requests longer than this are refused.
    pub max_position: usize,
}

impl LlamaConfig {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.n_layers == 0
            || self.intermediate_size == 0
        {
            return bad(format!("zero-sized dimension in {self:?}"));
        }
        if self.n_heads == 0
            || self.n_kv_heads == 0
            || !self.n_heads.is_multiple_of(self.n_kv_heads)
        {
            return bad(format!(
                "{} heads cannot share {} key/value heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} must be even", self.head_dim));
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.head_dim / 2 {
                return bad(format!(
                    "{} rope frequency factors for head dimension {}",
                    f.len(),
                    self.head_dim
                ));
            }
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!(
                "rms epsilon {} is not a finite number >= 0",
                self.rms_eps
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!(
                "rope theta {} is not a finite number > 0",
                self.rope_theta
            ));
        }
        Ok(())
    }

    /// Inverse frequency of each rotated pair, after any frequency scaling.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf(2.0 * i as f32 / self.head_dim as f32);
                match &self.rope_freq_factors {
                    Some(factors) => f / factors[i],
                    None => f,
                }
            })
            .collect()
    }
}

/// Llama 3.1's `rope_scaling` (`rope_type: llama3`) expressed as per-frequency divisors, the form
/// GGUF stores in `rope_freqs.weight`.
pub fn llama3_freq_factors(
    head_dim: usize,
    theta: f32,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_max_position: f32,
) -> Vec<f32> {
    let low_wavelen = original_max_position / low_freq_factor;
    let high_wavelen = original_max_position / high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original_max_position / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                // new_freq = (1 - smooth) * freq / factor + smooth * freq, as a divisor of freq.
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}
