//! The six preference row formats: detection and normalisation into [`Pair`].
//!
//! | format            | keys                                                            | becomes |
//! |-------------------|-----------------------------------------------------------------|---------|
//! | `standard`        | `prompt`, `chosen`, `rejected`: strings                           | text    |
//! | `implicit_prompt` | `chosen`, `rejected` only: strings or message lists              | text / chat |
//! | `conversational`  | `prompt`, `chosen`, `rejected`: lists of `{role, content}`        | chat    |
//! | `openai`          | `input.messages`, `preferred_output`, `non_preferred_output`    | chat    |
//! | `hh`              | `chosen`, `rejected`: `"\n\nHuman: ...\n\nAssistant: ..."` transcripts | chat |
//! | `sharegpt`        | `conversations` `[{from, value}]`, optional `system`, `chosen`/`rejected` `{from, value}` | chat |
//!
//! Sources: TRL 1.16 dataset formats (`trl/data_utils.py`: `is_conversational`,
//! `extract_prompt`), OpenAI preference fine-tuning JSONL, Anthropic HH-RLHF (`anthropics/hh-rlhf`),
//! LLaMA-Factory `data/README.md` (ShareGPT preference layout).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Message, Pair, SkipReason};

/// A preference row format. Names (config `data.format`, `--format`): `standard`,
/// `implicit_prompt`, `conversational`, `openai`, `hh`, `sharegpt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `prompt`, `chosen`, `rejected` strings (plain text, no chat template).
    Standard,
    /// `chosen` and `rejected` only; the prompt is their shared beginning.
    ImplicitPrompt,
    /// `prompt`, `chosen`, `rejected` as lists of `{role, content}` messages.
    Conversational,
    /// OpenAI preference fine-tuning: `input.messages`, `preferred_output`, `non_preferred_output`.
    Openai,
    /// Anthropic HH transcripts (`"\n\nHuman: ..."` / `"\n\nAssistant: ..."` turns).
    Hh,
    /// ShareGPT as LLaMA-Factory writes it.
    Sharegpt,
}

impl Format {
    /// Every format, in the order of the table above.
    pub const ALL: [Format; 6] =
        [Format::Standard, Format::ImplicitPrompt, Format::Conversational, Format::Openai, Format::Hh, Format::Sharegpt];

    /// The config/CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Standard => "standard",
            Format::ImplicitPrompt => "implicit_prompt",
            Format::Conversational => "conversational",
            Format::Openai => "openai",
            Format::Hh => "hh",
            Format::Sharegpt => "sharegpt",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    /// Errors list the valid names.
    fn from_str(s: &str) -> Result<Self, String> {
        Format::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
            format!("unknown data format {s:?}; should be one of {}", names.join(", "))
        })
    }
}

/// The run config's `data.format`: `"auto"` (the format detected per file, every row agreeing
/// with the first) or one [`Format`]'s name. Read as a string, so a bad value is a config error
/// with its file and line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FormatChoice {
    /// Detect the format of each file.
    #[default]
    Auto,
    /// Every file is in this format.
    Fixed(Format),
}

impl FormatChoice {
    /// The format to force on the loader ([`super::LoadOptions::format`]); `None` detects it.
    pub fn fixed(self) -> Option<Format> {
        match self {
            FormatChoice::Auto => None,
            FormatChoice::Fixed(f) => Some(f),
        }
    }
}

impl TryFrom<String> for FormatChoice {
    type Error = String;

    /// `"auto"` or a [`Format`] name; errors list the valid names.
    fn try_from(s: String) -> Result<Self, String> {
        if s == "auto" {
            return Ok(FormatChoice::Auto);
        }
        s.parse::<Format>().map(FormatChoice::Fixed).map_err(|e| format!("{e} (or \"auto\")"))
    }
}

impl From<FormatChoice> for String {
    fn from(c: FormatChoice) -> String {
        match c {
            FormatChoice::Auto => "auto".into(),
            FormatChoice::Fixed(f) => f.name().into(),
        }
    }
}

/// A problem with one row; the loader prefixes it with `file:line: `. The message names the
/// field, e.g. `missing field "rejected"` or `field "chosen[0].content": expected a string, got null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError(pub String);

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a row becomes: a pair, or a counted skip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Normalized {
    /// A usable pair.
    Pair(Pair),
    /// A row left out, counted under this reason.
    Skip(SkipReason),
}

/// Marker opening an HH human turn.
pub const HH_HUMAN: &str = "\n\nHuman:";
/// Marker opening an HH assistant turn.
pub const HH_ASSISTANT: &str = "\n\nAssistant:";

/// Assistant-turn markers at which an implicit text prompt is cut (the prompt ends right after
/// the last one inside the shared beginning): HH, ChatML, Zephyr, Llama-2.
pub const ASSISTANT_MARKERS: [&str; 4] = [HH_ASSISTANT, "<|im_start|>assistant\n", "<|assistant|>\n", "[/INST]"];

/// The format a single row looks like, from its keys (and, for `chosen`-only rows, whether
/// `chosen` is an HH transcript).
///
/// Errors: the row is not an object, a key has a type no format allows, or no known key set.
pub fn detect(row: &Value) -> Result<Format, RowError> {
    let obj = object(row)?;
    if obj.contains_key("input") || obj.contains_key("preferred_output") || obj.contains_key("non_preferred_output") {
        return Ok(Format::Openai);
    }
    if obj.contains_key("conversations") {
        return Ok(Format::Sharegpt);
    }
    if let Some(p) = obj.get("prompt") {
        return match p {
            Value::String(_) => Ok(Format::Standard),
            Value::Array(_) => Ok(Format::Conversational),
            other => Err(wrong_type("prompt", "a string or a list of messages", other)),
        };
    }
    match obj.get("chosen") {
        Some(Value::String(s)) if s.starts_with(HH_HUMAN) && s.contains(HH_ASSISTANT) => Ok(Format::Hh),
        Some(Value::String(_) | Value::Array(_)) => Ok(Format::ImplicitPrompt),
        Some(other) => Err(wrong_type("chosen", "a string or a list of messages", other)),
        None if obj.contains_key("rejected") => Err(missing("chosen")),
        None => {
            let keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
            Err(RowError(format!(
                "cannot detect the row format from keys [{}]; expected prompt/chosen/rejected, chosen/rejected, \
                 input/preferred_output/non_preferred_output, or conversations/chosen/rejected",
                keys.join(", ")
            )))
        }
    }
}

/// Normalise `row`, read as `format`, into a [`Pair`] or a counted skip (empty chosen/rejected,
/// identical chosen/rejected, HH rows without a shared prompt).
///
/// Errors: a missing field, a field of the wrong type, an unknown ShareGPT role.
pub fn normalize(format: Format, row: &Value) -> Result<Normalized, RowError> {
    let obj = object(row)?;
    match format {
        Format::Standard => standard(obj),
        Format::ImplicitPrompt => implicit(obj),
        Format::Conversational => conversational(obj),
        Format::Openai => openai(obj),
        Format::Hh => hh(obj),
        Format::Sharegpt => sharegpt(obj),
    }
}

fn standard(obj: &Map<String, Value>) -> Result<Normalized, RowError> {
    let prompt = string(field(obj, "prompt")?, "prompt")?;
    let chosen = string(field(obj, "chosen")?, "chosen")?;
    let rejected = string(field(obj, "rejected")?, "rejected")?;
    Ok(checked(Pair::Text { prompt: prompt.into(), chosen: chosen.into(), rejected: rejected.into() }))
}

fn conversational(obj: &Map<String, Value>) -> Result<Normalized, RowError> {
    let prompt = messages(field(obj, "prompt")?, "prompt")?;
    let chosen = completion(field(obj, "chosen")?, "chosen")?;
    let rejected = completion(field(obj, "rejected")?, "rejected")?;
    Ok(checked(Pair::Chat { prompt, chosen, rejected }))
}

fn openai(obj: &Map<String, Value>) -> Result<Normalized, RowError> {
    let input = object_field(field(obj, "input")?, "input")?;
    let prompt = messages(input.get("messages").ok_or_else(|| missing("input.messages"))?, "input.messages")?;
    let chosen = completion(field(obj, "preferred_output")?, "preferred_output")?;
    let rejected = completion(field(obj, "non_preferred_output")?, "non_preferred_output")?;
    Ok(checked(Pair::Chat { prompt, chosen, rejected }))
}

/// Implicit prompt (TRL `extract_prompt`): the prompt is the shared beginning of `chosen` and
/// `rejected`. Conversations: the shared leading messages; what follows on each side must be
/// assistant messages only, otherwise the row is skipped ([`SkipReason::CompletionNotAssistant`]:
/// the lists end in a user turn, or diverge before their final assistant turn). Text: the
/// longest common prefix, cut right after the last [`ASSISTANT_MARKERS`] marker inside it when
/// there is one, otherwise (as TRL) moved back one character when the first differing character
/// follows a space.
fn implicit(obj: &Map<String, Value>) -> Result<Normalized, RowError> {
    let chosen = field(obj, "chosen")?;
    let rejected = field(obj, "rejected")?;
    match chosen {
        Value::String(c) => {
            let r = string(rejected, "rejected")?;
            if c == r {
                return Ok(Normalized::Skip(if c.trim().is_empty() { SkipReason::EmptyChosen } else { SkipReason::Identical }));
            }
            let cut = implicit_text_prompt_len(c, r);
            Ok(checked(Pair::Text { prompt: c[..cut].into(), chosen: c[cut..].into(), rejected: r[cut..].into() }))
        }
        Value::Array(_) => {
            let c = messages(chosen, "chosen")?;
            let r = messages(rejected, "rejected")?;
            if c == r {
                return Ok(checked(Pair::Chat { prompt: vec![], chosen: c, rejected: r }));
            }
            let k = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            let prompt = c[..k].to_vec();
            let answers_only = |m: &[Message]| m.iter().all(|m| m.role == "assistant");
            if !answers_only(&c[k..]) || !answers_only(&r[k..]) {
                return Ok(Normalized::Skip(SkipReason::CompletionNotAssistant));
            }
            Ok(checked(Pair::Chat { prompt, chosen: c[k..].to_vec(), rejected: r[k..].to_vec() }))
        }
        other => Err(wrong_type("chosen", "a string or a list of messages", other)),
    }
}

/// Byte length of the implicit prompt shared by `chosen` and `rejected` (a char boundary of both).
pub fn implicit_text_prompt_len(chosen: &str, rejected: &str) -> usize {
    let mut common = 0;
    let mut prev_space = false;
    let mut diverged = false;
    for ((i, a), b) in chosen.char_indices().zip(rejected.chars()) {
        if a != b {
            diverged = true;
            break;
        }
        prev_space = a == ' ';
        common = i + a.len_utf8();
    }
    let prefix = &chosen[..common];
    let marker_end = ASSISTANT_MARKERS.iter().filter_map(|m| prefix.rfind(m).map(|i| i + m.len())).max();
    match marker_end {
        Some(end) => end,
        // TRL: "remove space before the last word" — the space goes with the completion.
        None if diverged && prev_space => common - 1,
        None => common,
    }
}

/// Anthropic HH: the prompt is `chosen` up to and including its last `"\n\nAssistant:"`;
/// `rejected` must start with the same text, otherwise the row is skipped
/// ([`SkipReason::NoSharedPrompt`]). The prompt's turns become user/assistant messages; each
/// turn's text loses the one space after its marker.
fn hh(obj: &Map<String, Value>) -> Result<Normalized, RowError> {
    let chosen = string(field(obj, "chosen")?, "chosen")?;
    let rejected = string(field(obj, "rejected")?, "rejected")?;
    if chosen == rejected {
        return Ok(Normalized::Skip(SkipReason::Identical));
    }
    let last = chosen.rfind(HH_ASSISTANT).ok_or_else(|| {
        RowError(format!("field \"chosen\": not an HH transcript (no {HH_ASSISTANT:?} turn)"))
    })?;
    let end = last + HH_ASSISTANT.len();
    if !rejected.starts_with(&chosen[..end]) {
        return Ok(Normalized::Skip(SkipReason::NoSharedPrompt));
    }
    let prompt = hh_turns(&chosen[..last])?;
    let answer = |s: &str| Message::new("assistant", s.strip_prefix(' ').unwrap_or(s));
    Ok(checked(Pair::Chat { prompt, chosen: vec![answer(&chosen[end..])], rejected: vec![answer(&rejected[end..])] }))
}

/// Split an HH transcript into messages at its `"\n\nHuman:"` / `"\n\nAssistant:"` markers.
fn hh_turns(text: &str) -> Result<Vec<Message>, RowError> {
    let mut turns = Vec::new();
    let mut rest = text;
    if !rest.starts_with(HH_HUMAN) {
        return Err(RowError(format!("field \"chosen\": an HH transcript must start with {HH_HUMAN:?}")));
    }
    while !rest.is_empty() {
        let (role, marker) = if rest.starts_with(HH_HUMAN) { ("user", HH_HUMAN) } else { ("assistant", HH_ASSISTANT) };
        rest = &rest[marker.len()..];
        let next = [rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)].into_iter().flatten().min().unwrap_or(rest.len());
        let content = &rest[..next];
        turns.push(Message::new(role, content.strip_prefix(' ').unwrap_or(content)));
        rest = &rest[next..];
    }
    Ok(turns)
}

/// ShareGPT (LLaMA-Factory): `conversations` with `from` in human/gpt/system, optional `system`,
/// `chosen`/`rejected` `{from: "gpt", value}`.
fn sharegpt(obj: &Map<String, Value>) -> Result<Normalized, RowError> {
    let conv = array(field(obj, "conversations")?, "conversations")?;
    let mut prompt = Vec::with_capacity(conv.len() + 1);
    if let Some(sys) = obj.get("system") {
        let sys = string(sys, "system")?;
        if !sys.is_empty() {
            prompt.push(Message::new("system", sys));
        }
    }
    for (i, turn) in conv.iter().enumerate() {
        prompt.push(sharegpt_turn(turn, &format!("conversations[{i}]"), false)?);
    }
    let chosen = sharegpt_turn(field(obj, "chosen")?, "chosen", true)?;
    let rejected = sharegpt_turn(field(obj, "rejected")?, "rejected", true)?;
    Ok(checked(Pair::Chat { prompt, chosen: vec![chosen], rejected: vec![rejected] }))
}

fn sharegpt_turn(v: &Value, path: &str, answer: bool) -> Result<Message, RowError> {
    let turn = object_field(v, path)?;
    let from_path = format!("{path}.from");
    let from = string(turn.get("from").ok_or_else(|| missing(&from_path))?, &from_path)?;
    let value_path = format!("{path}.value");
    let value = string(turn.get("value").ok_or_else(|| missing(&value_path))?, &value_path)?;
    let role = match from {
        "gpt" => "assistant",
        "human" if !answer => "user",
        "system" if !answer => "system",
        other if answer => {
            return Err(RowError(format!("field \"{from_path}\": expected \"gpt\" for an answer, got {other:?}")))
        }
        other => {
            return Err(RowError(format!("field \"{from_path}\": unknown role {other:?} (expected human, gpt or system)")))
        }
    };
    Ok(Message::new(role, value))
}

/// Apply the row checks every format shares: empty chosen/rejected, identical chosen/rejected.
fn checked(pair: Pair) -> Normalized {
    let (chosen_empty, rejected_empty, identical) = match &pair {
        Pair::Text { chosen, rejected, .. } => (chosen.trim().is_empty(), rejected.trim().is_empty(), chosen == rejected),
        Pair::Chat { chosen, rejected, .. } => {
            let empty = |m: &[Message]| m.iter().all(|m| m.content.trim().is_empty());
            (empty(chosen), empty(rejected), chosen == rejected)
        }
    };
    if chosen_empty {
        Normalized::Skip(SkipReason::EmptyChosen)
    } else if rejected_empty {
        Normalized::Skip(SkipReason::EmptyRejected)
    } else if identical {
        Normalized::Skip(SkipReason::Identical)
    } else {
        Normalized::Pair(pair)
    }
}

// ---- typed field access with field paths in the errors ----

fn object(row: &Value) -> Result<&Map<String, Value>, RowError> {
    row.as_object().ok_or_else(|| RowError(format!("a row must be a JSON object, got {}", kind(row))))
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a Value, RowError> {
    obj.get(name).ok_or_else(|| missing(name))
}

fn missing(path: &str) -> RowError {
    RowError(format!("missing field \"{path}\""))
}

fn wrong_type(path: &str, expected: &str, got: &Value) -> RowError {
    RowError(format!("field \"{path}\": expected {expected}, got {}", kind(got)))
}

fn string<'a>(v: &'a Value, path: &str) -> Result<&'a str, RowError> {
    v.as_str().ok_or_else(|| wrong_type(path, "a string", v))
}

fn array<'a>(v: &'a Value, path: &str) -> Result<&'a Vec<Value>, RowError> {
    v.as_array().ok_or_else(|| wrong_type(path, "a list", v))
}

fn object_field<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, RowError> {
    v.as_object().ok_or_else(|| wrong_type(path, "an object", v))
}

/// The message roles a row may use: what chat templates know (a template renders any other
/// role as it likes, or not at all, so a row using one is refused).
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// A completion (`chosen`, `rejected`, `preferred_output`, ...): [`messages`], all of them
/// `assistant` messages. Errors name the first other role.
fn completion(v: &Value, path: &str) -> Result<Vec<Message>, RowError> {
    let list = messages(v, path)?;
    if let Some((i, m)) = list.iter().enumerate().find(|(_, m)| m.role != "assistant") {
        return Err(RowError(format!(
            "field \"{path}[{i}].role\": a completion holds assistant messages only, got {:?}",
            m.role
        )));
    }
    Ok(list)
}

/// A list of `{role, content}` messages; `content` is a string or a list of
/// `{"type": "text", "text": ...}` parts (OpenAI), joined. Roles must be one of [`ROLES`].
fn messages(v: &Value, path: &str) -> Result<Vec<Message>, RowError> {
    let list = v.as_array().ok_or_else(|| wrong_type(path, "a list of messages", v))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let p = format!("{path}[{i}]");
            let obj = object_field(m, &p)?;
            let role_path = format!("{p}.role");
            let role = string(obj.get("role").ok_or_else(|| missing(&role_path))?, &role_path)?;
            if !ROLES.contains(&role) {
                return Err(RowError(format!("field \"{role_path}\": unknown role {role:?} (expected system, user or assistant)")));
            }
            let content_path = format!("{p}.content");
            let content = obj.get("content").ok_or_else(|| missing(&content_path))?;
            Ok(Message::new(role, content_text(content, &content_path)?))
        })
        .collect()
}

fn content_text(v: &Value, path: &str) -> Result<String, RowError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (i, part) in parts.iter().enumerate() {
                let p = format!("{path}[{i}]");
                let obj = object_field(part, &p)?;
                let text_path = format!("{p}.text");
                match obj.get("type").and_then(Value::as_str) {
                    Some("text") => out.push_str(string(obj.get("text").ok_or_else(|| missing(&text_path))?, &text_path)?),
                    _ => return Err(RowError(format!("field \"{p}\": only {{\"type\": \"text\"}} content parts are supported"))),
                }
            }
            Ok(out)
        }
        other => Err(wrong_type(path, "a string or a list of text parts", other)),
    }
}

/// "a string", "null", ... for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(prompt: &[(&str, &str)], chosen: &str, rejected: &str) -> Normalized {
        Normalized::Pair(Pair::Chat {
            prompt: prompt.iter().map(|(r, c)| Message::new(*r, *c)).collect(),
            chosen: vec![Message::new("assistant", chosen)],
            rejected: vec![Message::new("assistant", rejected)],
        })
    }

    #[test]
    fn detects_each_format() {
        let cases = [
            (json!({"prompt": "p", "chosen": "a", "rejected": "b"}), Format::Standard),
            (json!({"chosen": "p a", "rejected": "p b"}), Format::ImplicitPrompt),
            (json!({"chosen": [], "rejected": []}), Format::ImplicitPrompt),
            (json!({"prompt": [], "chosen": [], "rejected": []}), Format::Conversational),
            (json!({"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}), Format::Openai),
            (json!({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "x"}), Format::Hh),
            (json!({"conversations": [], "chosen": {}, "rejected": {}}), Format::Sharegpt),
        ];
        for (row, want) in cases {
            assert_eq!(detect(&row).unwrap(), want, "{row}");
        }
        let e = detect(&json!({"question": "q"})).unwrap_err();
        assert!(e.0.contains("[question]"), "{e}");
        assert_eq!(detect(&json!({"rejected": "b"})).unwrap_err().0, "missing field \"chosen\"");
        assert!(detect(&json!({"prompt": 3})).unwrap_err().0.contains("field \"prompt\": expected a string or a list"));
        assert!(detect(&json!([1])).unwrap_err().0.contains("must be a JSON object, got a list"));
    }

    #[test]
    fn format_names_round_trip_and_unknown_lists_valid() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        let e = "orca".parse::<Format>().unwrap_err();
        assert!(e.contains("standard, implicit_prompt, conversational, openai, hh, sharegpt"), "{e}");
    }

    #[test]
    fn hh_transcript_becomes_a_conversation() {
        let row = json!({
            "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this",
            "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: no",
        });
        let got = normalize(Format::Hh, &row).unwrap();
        assert_eq!(got, chat(&[("user", "hi"), ("assistant", "hello"), ("user", "how?")], "like this", "no"));
        let row = json!({
            "chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: b\n\nAssistant: c",
            "rejected": "\n\nHuman: hi\n\nAssistant: x",
        });
        assert_eq!(normalize(Format::Hh, &row).unwrap(), Normalized::Skip(SkipReason::NoSharedPrompt));
    }

    #[test]
    fn implicit_text_cuts_at_last_assistant_marker() {
        let c = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello there";
        let r = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello you";
        let n = implicit_text_prompt_len(c, r);
        assert_eq!(&c[..n], "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        // no marker: TRL's rule, the space before the differing word goes to the completion
        let n = implicit_text_prompt_len("The sky is blue", "The sky is green");
        assert_eq!(n, "The sky is".len());
        // multi-byte characters: the cut is a char boundary
        let n = implicit_text_prompt_len("é€a", "é€b");
        assert_eq!(n, "é€".len());
    }

    #[test]
    fn implicit_conversation_shares_leading_messages() {
        let row = json!({
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
        });
        assert_eq!(normalize(Format::ImplicitPrompt, &row).unwrap(), chat(&[("user", "q")], "good", "bad"));
    }

    #[test]
    fn sharegpt_maps_roles_and_system() {
        let row = json!({
            "conversations": [{"from": "human", "value": "q"}],
            "system": "be brief",
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        });
        assert_eq!(normalize(Format::Sharegpt, &row).unwrap(), chat(&[("system", "be brief"), ("user", "q")], "good", "bad"));
        let row = json!({
            "conversations": [{"from": "observation", "value": "q"}],
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        });
        let e = normalize(Format::Sharegpt, &row).unwrap_err();
        assert!(e.0.contains("\"conversations[0].from\": unknown role \"observation\""), "{e}");
    }

    #[test]
    fn openai_content_parts_are_joined() {
        let row = json!({
            "input": {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
            "preferred_output": [{"role": "assistant", "content": "good"}],
            "non_preferred_output": [{"role": "assistant", "content": "bad"}],
        });
        assert_eq!(normalize(Format::Openai, &row).unwrap(), chat(&[("user", "ab")], "good", "bad"));
    }

    #[test]
    fn empty_and_identical_are_skips() {
        let n = |c: &str, r: &str| normalize(Format::Standard, &json!({"prompt": "p", "chosen": c, "rejected": r})).unwrap();
        assert_eq!(n(" ", "b"), Normalized::Skip(SkipReason::EmptyChosen));
        assert_eq!(n("a", ""), Normalized::Skip(SkipReason::EmptyRejected));
        assert_eq!(n("a", "a"), Normalized::Skip(SkipReason::Identical));
    }

    #[test]
    fn errors_name_the_field() {
        let e = normalize(Format::Conversational, &json!({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}))
            .unwrap_err();
        assert_eq!(e.0, "missing field \"prompt[0].content\"");
        let e = normalize(Format::Openai, &json!({"input": {}, "preferred_output": [], "non_preferred_output": []}))
            .unwrap_err();
        assert_eq!(e.0, "missing field \"input.messages\"");
        let e = normalize(Format::Standard, &json!({"prompt": "p", "chosen": 1, "rejected": "r"})).unwrap_err();
        assert_eq!(e.0, "field \"chosen\": expected a string, got a number");
    }
}
