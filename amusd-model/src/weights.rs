//! One assembly of a Llama from its tensors, whatever the file: a GGUF file and a Hugging Face
//! checkpoint differ only in what the tensors are called and how one is read, which is all a
//! [`WeightSource`] says.

use crate::config::LlamaConfig;
use crate::linear::Linear;
use crate::llama::{Block, Llama};
use crate::ModelError;

/// A Llama tensor, by its role; layers are numbered from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tensor {
    Embedding,
    Output,
    OutputNorm,
    AttnNorm(usize),
    Query(usize),
    Key(usize),
    Value(usize),
    AttnOutput(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

/// Where a Llama's tensors are read from, in the weight format the source was opened with.
pub trait WeightSource {
    /// Whether the file has the tensor (only the output projection is optional).
    fn has(&self, t: Tensor) -> bool;
    /// Whether the output projection is the embedding matrix, whatever the file holds.
    fn tied_output(&self) -> bool;
    /// A matrix, checked to be `rows x cols`.
    fn linear(&mut self, t: Tensor, rows: usize, cols: usize) -> Result<Linear, ModelError>;
    /// A vector, checked to hold `len` values.
    fn vector(&mut self, t: Tensor, len: usize) -> Result<Vec<f32>, ModelError>;
}

/// Reads every tensor of a `cfg`-shaped Llama from `src`.
pub fn assemble(cfg: LlamaConfig, src: &mut dyn WeightSource) -> Result<Llama, ModelError> {
    let (h, q, kv, ff, v) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let embed = src.linear(Tensor::Embedding, v, h)?;
    let lm_head = if src.tied_output() || !src.has(Tensor::Output) {
        embed.clone()
    } else {
        src.linear(Tensor::Output, v, h)?
    };
    // The layer count is the file's word: a corrupt one must end at the first missing tensor,
    // not in an allocation sized by it (a fuzzed block count once asked for 286 GB here).
    let mut blocks = Vec::new();
    for i in 0..cfg.n_layers {
        blocks.push(Block {
            attn_norm: src.vector(Tensor::AttnNorm(i), h)?,
            wqkv: Linear::concat(&[
                src.linear(Tensor::Query(i), q, h)?,
                src.linear(Tensor::Key(i), kv, h)?,
                src.linear(Tensor::Value(i), kv, h)?,
            ])?,
            wo: src.linear(Tensor::AttnOutput(i), h, q)?,
            ffn_norm: src.vector(Tensor::FfnNorm(i), h)?,
            w_gate_up: Linear::concat(&[
                src.linear(Tensor::Gate(i), ff, h)?,
                src.linear(Tensor::Up(i), ff, h)?,
            ])?,
            w_down: src.linear(Tensor::Down(i), h, ff)?,
        });
    }
    let norm = src.vector(Tensor::OutputNorm, h)?;
    Llama::new(cfg, embed, blocks, norm, lm_head)
}

/// A vector (a norm's weights, rope factors) checked: `len` values, every one finite. A NaN or
/// infinite norm weight makes every logit NaN, and the model answered nothing without a word.
pub(crate) fn check_len(name: &str, v: Vec<f32>, len: usize) -> Result<Vec<f32>, ModelError> {
    if v.len() != len {
        return Err(ModelError::Shape(format!(
            "tensor '{name}' has {} values, expected {len}",
            v.len()
        )));
    }
    if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
        return Err(ModelError::Config(format!(
            "tensor '{name}' holds {bad}: the checkpoint is damaged"
        )));
    }
    Ok(v)
}
