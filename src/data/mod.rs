//! Preference data: row formats, chat templates, tokenization with completion masks, batching.

pub mod template;
