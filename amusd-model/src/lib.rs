//! Llama-family language models for amusd.
//!
//! This crate owns everything between a model file and greedy next tokens: reading weights (GGUF,
//! Hugging Face safetensors), choosing how they run (as stored, requantized, dequantized), the forward
//! pass with a preallocated KV cache that rolls back in O(1), the batch-invariant kernels that make
//! batched verification exact, tokenizers and chat templates.
//!
//! The CPU forward runs on host buffers through [`kernels`] rather than candle's tensor ops: exact
//! speculative decoding needs control of every reduction order (see [`kernels`]). candle reads,
//! dequantizes and requantizes the weights and multiplies the block-quantized ones.

pub mod attention;
pub mod cache;
pub mod chat;
pub mod config;
pub mod device;
mod error;
pub mod files;
pub mod gguf;
mod gguf_header;
pub mod greedy_head;
pub mod hf;
pub mod hugepages;
pub mod kernels;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod paths;
pub mod qexact;
pub mod qkernels;
pub mod ranking;
pub mod screen;
pub mod silu;
pub mod softmax;
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use cache::{KvCache, KvPrecision};
pub use config::LlamaConfig;
pub use device::DeviceSpec;
pub use error::ModelError;
pub use linear::{Batching, Linear, WeightFormat};
pub use llama::{BlockHook, Llama, Logits, LogitsFor};
pub use loader::{load, HeadChoice, LoadedModel, ModelSpec};
pub use paths::default_model_path;
