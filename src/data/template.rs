//! Hugging Face chat templates rendered with minijinja, with transformers' semantics:
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `tojson`,
//! `trim_blocks` and `lstrip_blocks` on (as `transformers.utils.chat_template_utils` sets them).

use serde::{Deserialize, Serialize};

/// One chat message, `{"role": ..., "content": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compile `source` (a Jinja chat template). `bos_token`/`eos_token` are exposed to it.
    ///
    /// Errors: a template syntax error, with minijinja's line information.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self, minijinja::Error> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// Render `messages`; with `add_generation_prompt` the template appends the opening of an
    /// assistant turn (e.g. `<|im_start|>assistant\n`).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, minijinja::Error> {
        let tmpl = self.env.get_template("chat")?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ../shared/golden/smollm2_golden.json, `chat_template`: transformers' renderings of the
    // SmolLM2-135M-Instruct template.
    fn golden() -> serde_json::Value {
        let s = std::fs::read_to_string("../shared/golden/smollm2_golden.json").expect("golden file");
        serde_json::from_str(&s).unwrap()
    }

    fn msgs(v: &serde_json::Value) -> Vec<Message> {
        serde_json::from_value(v.clone()).unwrap()
    }

    #[test]
    fn renders_like_transformers() {
        let g = &golden()["chat_template"];
        let t = ChatTemplate::new(g["template"].as_str().unwrap(), None, None).unwrap();
        let m = msgs(&g["messages"]);
        assert_eq!(t.render(&m, true).unwrap(), g["rendered_add_generation_prompt_true"].as_str().unwrap());
        assert_eq!(t.render(&m, false).unwrap(), g["rendered_add_generation_prompt_false"].as_str().unwrap());
        let m = msgs(&g["messages_with_assistant"]);
        assert_eq!(t.render(&m, false).unwrap(), g["rendered_with_assistant"].as_str().unwrap());
        let m = msgs(&g["messages_no_system"]);
        assert_eq!(t.render(&m, true).unwrap(), g["rendered_no_system_add_generation_prompt_true"].as_str().unwrap());
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", None, None).unwrap();
        let e = t.render(&[], false).unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
    }
}
