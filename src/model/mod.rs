//! The Llama-family model runtime and its loaders.

pub mod config;
pub mod linear;
pub mod tokenizer;
pub mod llama;
pub mod ops;
