//! The Llama-family model runtime and its loaders.

pub mod config;
pub mod gguf;
pub mod hf_config;
pub mod linear;
pub mod tokenizer;
