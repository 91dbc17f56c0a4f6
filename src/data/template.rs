//! Hugging Face chat templates rendered with minijinja, with transformers' semantics:
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, `tojson`,
//! `trim_blocks` and `lstrip_blocks` on (as `transformers.utils.chat_template_utils` sets them).
//! `tojson` is transformers' override (`json.dumps(x, ensure_ascii=False, indent=indent,
//! separators=separators, sort_keys=sort_keys)`: `", "`/`": "` separators, no HTML escaping),
//! not minijinja's built-in one (compact, HTML-escaped).

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
        env.add_filter("tojson", tojson);
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

/// transformers' `tojson` filter (`chat_template_utils._compile_jinja_template`):
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, keyword
/// arguments `indent` (int or string), `ensure_ascii`, `separators` (a 2-list), `sort_keys`.
fn tojson(value: minijinja::Value, kwargs: minijinja::value::Kwargs) -> Result<minijinja::Value, minijinja::Error> {
    let indent: Option<minijinja::Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v)?),
        }),
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, &value, &opts, 0)?;
    Ok(minijinja::Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn write_json(out: &mut String, v: &minijinja::Value, o: &JsonOpts, level: usize) -> Result<(), minijinja::Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            out.push_str(&ind.repeat(level));
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => out.push_str(&py_float(f64::try_from(v.clone())?)),
        ValueKind::String => json_str(out, v.as_str().unwrap_or_default(), o.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<minijinja::Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, level + 1);
                write_json(out, item, o, level + 1)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<minijinja::Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, level + 1);
                json_str(out, &k.to_string(), o.ensure_ascii);
                out.push_str(&o.key_sep);
                write_json(out, &v.get_item(k)?, o, level + 1)?;
            }
            newline(out, level);
            out.push('}');
        }
        kind => {
            return Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a {kind} value"),
            ))
        }
    }
    Ok(())
}

/// A JSON string literal as Python's `json.dumps` writes it.
fn json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)` (what `json.dumps` writes): `1.0`, `2.5`, `1e+16`, `1e-07`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = e.strip_prefix('-').map_or(('+', e), |d| ('-', d));
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
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

    #[test]
    fn tojson_is_pythons_json_dumps() {
        // expected strings from Python 3.11: json.dumps(x, ensure_ascii=False[, indent=2]) and
        // json.dumps(x, ensure_ascii=True, sort_keys=True) with
        // x = {'role': 'user', 'content': 'a<b> & \'q\' "d" é 日 😀\n\t\x01',
        //      'n': [1, 2.5, 1e16, 1e-7, True, None, []], 'z': {}}
        #[derive(Serialize)]
        struct X {
            role: &'static str,
            content: &'static str,
            n: serde_json::Value,
            z: std::collections::BTreeMap<String, String>,
        }
        let x = X {
            role: "user",
            content: "a<b> & 'q' \"d\" é 日 😀\n\t\u{1}",
            n: serde_json::json!([1, 2.5, 1e16, 1e-7, true, null, []]),
            z: Default::default(),
        };
        let ctx = minijinja::context! { x => x };
        let render = |src: &str| {
            let t = ChatTemplate::new(src, None, None).unwrap();
            let tmpl = t.env.get_template("chat").unwrap();
            tmpl.render(&ctx).unwrap()
        };
        assert_eq!(
            render("{{ x | tojson }}"),
            r#"{"role": "user", "content": "a<b> & 'q' \"d\" é 日 😀\n\t\u0001", "n": [1, 2.5, 1e+16, 1e-07, true, null, []], "z": {}}"#
        );
        assert_eq!(
            render("{{ x | tojson(indent=2) }}"),
            "{\n  \"role\": \"user\",\n  \"content\": \"a<b> & 'q' \\\"d\\\" é 日 😀\\n\\t\\u0001\",\n  \"n\": [\n    1,\n    2.5,\n    1e+16,\n    1e-07,\n    true,\n    null,\n    []\n  ],\n  \"z\": {}\n}"
        );
        assert_eq!(
            render("{{ x | tojson(ensure_ascii=true, sort_keys=true) }}"),
            r#"{"content": "a<b> & 'q' \"d\" \u00e9 \u65e5 \ud83d\ude00\n\t\u0001", "n": [1, 2.5, 1e+16, 1e-07, true, null, []], "role": "user", "z": {}}"#
        );
    }
}
