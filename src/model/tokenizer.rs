//! The tokenizer bundle: a `tokenizers::Tokenizer` plus what chat rendering needs
//! (chat template, BOS/EOS tokens), from `tokenizer.json` + `tokenizer_config.json` or from
//! GGUF `tokenizer.ggml.*` metadata.

/// A tokenizer with its chat template and special tokens.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// The HF tokenizer (byte-level BPE for the Llama family).
    pub inner: tokenizers::Tokenizer,
    /// The Jinja chat template (`tokenizer_config.json` `chat_template`, or GGUF
    /// `tokenizer.chat_template`), if the model has one.
    pub chat_template: Option<String>,
    /// BOS token text (e.g. `<|im_start|>` for SmolLM2), if any.
    pub bos_token: Option<String>,
    /// EOS token text (e.g. `<|im_end|>`), if any.
    pub eos_token: Option<String>,
    /// Token ids that end generation (EOS plus generation_config's `eos_token_id`s).
    pub eos_token_ids: Vec<u32>,
}
