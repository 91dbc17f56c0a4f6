//! The preference row formats: detection and normalisation into [`Pair`].
//!
//! | format            | keys                                                            | detected | becomes |
//! |-------------------|-----------------------------------------------------------------|----------|---------|
//! | `standard`        | `prompt`, `chosen`, `rejected`: strings                           | yes | text    |
//! | `implicit_prompt` | `chosen`, `rejected` only: strings or message lists              | yes | text / chat |
//! | `conversational`  | `prompt`, `chosen`, `rejected`: lists of `{role, content}`        | yes | chat    |
//! | `openai`          | `input.messages`, `preferred_output`, `non_preferred_output`    | yes | chat    |
//! | `hh`              | `chosen`, `rejected`: `"\n\nHuman: ...\n\nAssistant: ..."` transcripts | yes | chat |
//! | `sharegpt`        | `conversations` `[{from, value}]`, optional `system`, `chosen`/`rejected` `{from, value}` | yes | chat |
//! | `alpaca`          | `instruction`, optional `input`, `chosen`, `rejected`: strings; optional `system`, `history` `[[user, assistant], ...]` | yes (`instruction` + `chosen`) | chat |
//! | `chat_template`   | `messages` `[{role, content}]` (or a string), `chosen`/`rejected`: a `{role, content}` message, a string or a message list (its last) | yes (`messages` + `chosen`, no `prompt`) | chat |
//! | `axolotl_argilla` | `instruction`, `chosen_response`, `rejected_response`, optional `system` | yes (`chosen_response` / `rejected_response`) | chat |
//! | `axolotl_icr`     | `input`, `chosen`, `rejected`: strings, optional `system`         | yes (`input` a string, no `instruction`) | chat |
//! | `axolotl_intel`   | `question`, `chosen`, `rejected`: strings, optional `system`      | yes (`question` + `chosen`) | chat |
//! | `axolotl_prompt_pairs` | `prompt`, `chosen`, `rejected`: strings, optional `system`   | no: the keys are `standard`'s | chat |
//! | `axolotl_ultra`   | `prompt` string, `chosen`/`rejected` `[user, assistant]` lists, optional `system` | yes (`prompt` a string, `chosen` and `rejected` lists) | chat |
//! | `axolotl_nectar`  | `prompt`, `answers` `[{answer, rank}]`                          | yes (`answers`) | chat |
//!
//! Where a source renders the prompt through a fixed template (axolotl's `chatml.*` /
//! `llama3.*` strategies write ChatML / Llama-3 text), the row becomes the messages that template
//! was given (system, then user) and the model's own chat template renders them.
//!
//! Sources: TRL 1.16 dataset formats (`trl/data_utils.py`: `is_conversational`,
//! `extract_prompt`), OpenAI preference fine-tuning JSONL, Anthropic HH-RLHF (`anthropics/hh-rlhf`),
//! LLaMA-Factory `data/README.md` and `src/llamafactory/data/converter.py`
//! (`AlpacaDatasetConverter`, `SharegptDatasetConverter`, `OpenAIDatasetConverter`: `alpaca`,
//! `sharegpt`, and `chat_template` for its OpenAI-style `messages` layout), axolotl
//! `docs/rlhf.qmd` and `src/axolotl/prompt_strategies/dpo/` (`chatml.py` / `llama3.py`:
//! `argilla`, `icr`, `intel`, `prompt_pairs`, `ultra`; `zephyr.py`: `nectar`;
//! `chat_template.py`: `default`). Axolotl layouts covered by an existing format:
//! `chatml.argilla_chat` / `llama3.argilla_chat` / `chat_template.argilla_chat` are
//! `implicit_prompt` conversations (the prompt is the shared leading turns; a row whose rejected
//! turns differ from chosen's before the answer is skipped, where axolotl would pair the rejected
//! answer with chosen's prompt); `user_defined.default` with its default fields and formats is
//! `standard` (custom field names and format strings are not supported); `passthrough` is TRL's
//! own formats.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Message, Pair, SkipReason};

/// A preference row format. Names (config `data.format`, `--format`): `standard`,
/// `implicit_prompt`, `conversational`, `openai`, `hh`, `sharegpt`, `alpaca`, `chat_template`,
/// `axolotl_argilla`, `axolotl_icr`, `axolotl_intel`, `axolotl_prompt_pairs`, `axolotl_ultra`,
/// `axolotl_nectar`.
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
    /// LLaMA-Factory's Alpaca preference layout (`data/README.md`, `AlpacaDatasetConverter` in
    /// `src/llamafactory/data/converter.py`): `instruction`, optional `input`, `chosen`,
    /// `rejected`, optional `system` and `history`.
    Alpaca,
    /// A `messages` list and single `chosen` / `rejected` messages: axolotl's
    /// `chat_template.default` (`src/axolotl/prompt_strategies/dpo/chat_template.py`), and
    /// LLaMA-Factory's OpenAI-style sharegpt preference rows (`OpenAIDatasetConverter`).
    ChatTemplate,
    /// axolotl `chatml.argilla` / `llama3.argilla` (`docs/rlhf.qmd`; `default` in
    /// `src/axolotl/prompt_strategies/dpo/chatml.py`): `instruction`, `chosen_response`,
    /// `rejected_response`, optional `system`.
    AxolotlArgilla,
    /// axolotl `chatml.icr` / `llama3.icr` (`icr` in `prompt_strategies/dpo/chatml.py`):
    /// `input`, `chosen`, `rejected`, optional `system`.
    AxolotlIcr,
    /// axolotl `chatml.intel` / `llama3.intel` (`intel` in `prompt_strategies/dpo/chatml.py`,
    /// Intel/orca_dpo_pairs): `question`, `chosen`, `rejected`, optional `system`.
    AxolotlIntel,
    /// axolotl `chatml.prompt_pairs` / `llama3.prompt_pairs` (`prompt_pairs` in
    /// `prompt_strategies/dpo/chatml.py`): `prompt`, `chosen`, `rejected` strings, optional
    /// `system`; never detected (the keys are [`Format::Standard`]'s).
    AxolotlPromptPairs,
    /// axolotl `chatml.ultra` / `llama3.ultra` (`ultra` in `prompt_strategies/dpo/chatml.py`):
    /// `prompt` string, `chosen` / `rejected` `[user, assistant]` lists, optional `system`.
    AxolotlUltra,
    /// axolotl `zephyr.nectar` (`nectar` in `prompt_strategies/dpo/zephyr.py`,
    /// berkeley-nest/Nectar): `prompt`, `answers` `[{answer, rank}]`.
    AxolotlNectar,
}

impl Format {
    /// Every format, in the order of the table above.
    pub const ALL: [Format; 14] = [
        Format::Standard,
        Format::ImplicitPrompt,
        Format::Conversational,
        Format::Openai,
        Format::Hh,
        Format::Sharegpt,
        Format::Alpaca,
        Format::ChatTemplate,
        Format::AxolotlArgilla,
        Format::AxolotlIcr,
        Format::AxolotlIntel,
        Format::AxolotlPromptPairs,
        Format::AxolotlUltra,
        Format::AxolotlNectar,
    ];

    /// The config/CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Standard => "standard",
            Format::ImplicitPrompt => "implicit_prompt",
            Format::Conversational => "conversational",
            Format::Openai => "openai",
            Format::Hh => "hh",
            Format::Sharegpt => "sharegpt",
            Format::Alpaca => "alpaca",
            Format::ChatTemplate => "chat_template",
            Format::AxolotlArgilla => "axolotl_argilla",
            Format::AxolotlIcr => "axolotl_icr",
            Format::AxolotlIntel => "axolotl_intel",
            Format::AxolotlPromptPairs => "axolotl_prompt_pairs",
            Format::AxolotlUltra => "axolotl_ultra",
            Format::AxolotlNectar => "axolotl_nectar",
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
/// `chosen` is an HH transcript). [`Format::AxolotlPromptPairs`] is never detected (its keys are
/// [`Format::Standard`]'s).
///
/// Errors: the row is not an object, a key has a type no format allows, or no known key set.
pub fn detect(row: &Value) -> Result<Format, RowError> {
    let obj = object(row)?;
    if let Some(f) = detect_by_key(obj) {
        return Ok(f);
    }
    if let Some(p) = obj.get("prompt") {
        let lists = [obj.get("chosen"), obj.get("rejected")].iter().all(|v| matches!(v, Some(Value::Array(_))));
        return match p {
            Value::String(_) if lists => Ok(Format::AxolotlUltra),
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
                 input/preferred_output/non_preferred_output, conversations/chosen/rejected, \
                 instruction/chosen/rejected, messages/chosen/rejected, instruction/chosen_response/rejected_response, \
                 input/chosen/rejected, question/chosen/rejected or prompt/answers",
                keys.join(", ")
            )))
        }
    }
}

/// Detection by a key only one format has (checked before the `prompt` / `chosen` rules).
fn detect_by_key(obj: &Map<String, Value>) -> Option<Format> {
    let has = |k: &str| obj.contains_key(k);
    if has("preferred_output") || has("non_preferred_output") {
        return Some(Format::Openai);
    }
    if has("chosen_response") || has("rejected_response") {
        return Some(Format::AxolotlArgilla);
    }
    match obj.get("input") {
        Some(Value::String(_)) if has("instruction") => return Some(Format::Alpaca),
        Some(Value::String(_)) => return Some(Format::AxolotlIcr),
        Some(_) => return Some(Format::Openai),
        None => {}
    }
    if has("conversations") {
        return Some(Format::Sharegpt);
    }
    if has("answers") {
        return Some(Format::AxolotlNectar);
    }
    if !has("chosen") {
        return None;
    }
    if has("instruction") {
        Some(Format::Alpaca)
    } else if has("question") {
        Some(Format::AxolotlIntel)
    } else if has("messages") && !has("prompt") {
        Some(Format::ChatTemplate)
    } else {
        None
    }
}

/// Normalise `row`, read as `format`, into a [`Pair`] or a counted skip (empty chosen/rejected,
/// identical chosen/rejected, HH rows without a shared prompt).
///
/// Errors: a missing field, a field of the wrong type, an unknown role, a ShareGPT conversation
/// out of turn order, tool-calling rows (`tools`, observation / function_call turns), Nectar
/// answers without a preference.
pub fn normalize(format: Format, row: &Value) -> Result<Normalized, RowError> {
    let obj = object(row)?;
    match format {
        Format::Standard => standard(obj),
        Format::ImplicitPrompt => implicit(obj),
        Format::Conversational => conversational(obj),
        Format::Openai => openai(obj),
        Format::Hh => hh(obj),
        Format::Sharegpt => sharegpt(obj),
        Format::Alpaca => alpaca(obj),
        Format::ChatTemplate => chat_template(obj),
        Format::AxolotlArgilla => single_turn(obj, "instruction", "chosen_response", "rejected_response"),
        Format::AxolotlIcr => single_turn(obj, "input", "chosen", "rejected"),
        Format::AxolotlIntel => single_turn(obj, "question", "chosen", "rejected"),
        Format::AxolotlPromptPairs => single_turn(obj, "prompt", "chosen", "rejected"),
        Format::AxolotlUltra => ultra(obj),
        Format::AxolotlNectar => nectar(obj),
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

/// ShareGPT (LLaMA-Factory `SharegptDatasetConverter`): `conversations` `[{from, value}]`,
/// optional `system` (a leading `from: "system"` turn replaces it), `chosen`/`rejected`
/// `{from: "gpt", value}`. As LLaMA-Factory, the turns alternate human, gpt, human, ... and end
/// in a human turn. Tool-calling rows (a non-empty `tools`, `observation` / `function_call`
/// turns) are refused: ropo's messages carry no tool calls.
fn sharegpt(obj: &Map<String, Value>) -> Result<Normalized, RowError> {
    no_tools(obj)?;
    let conv = array(field(obj, "conversations")?, "conversations")?;
    let mut system = optional_string(obj, "system")?.map(str::to_owned);
    let mut turns = Vec::with_capacity(conv.len());
    for (i, turn) in conv.iter().enumerate() {
        let path = format!("conversations[{i}]");
        let m = sharegpt_turn(turn, &path, false)?;
        if m.role == "system" && i == 0 {
            system = Some(m.content);
            continue;
        }
        let want = if turns.len() % 2 == 0 { "user" } else { "assistant" };
        if m.role != want {
            let (tag, got) = (if want == "user" { "human" } else { "gpt" }, sharegpt_tag(&m.role));
            return Err(RowError(format!("field \"{path}.from\": expected {tag:?} here (turns alternate human, gpt, ...), got {got:?}")));
        }
        turns.push(m);
    }
    if turns.len() % 2 == 0 {
        return Err(RowError(format!(
            "field \"conversations\": a preference conversation ends in a \"human\" turn (an odd number of turns), got {}",
            turns.len()
        )));
    }
    let mut prompt = system_message(system.as_deref());
    prompt.extend(turns);
    let chosen = sharegpt_turn(field(obj, "chosen")?, "chosen", true)?;
    let rejected = sharegpt_turn(field(obj, "rejected")?, "rejected", true)?;
    Ok(checked(Pair::Chat { prompt, chosen: vec![chosen], rejected: vec![rejected] }))
}

fn sharegpt_tag(role: &str) -> &str {
    match role {
        "user" => "human",
        "assistant" => "gpt",
        other => other,
    }
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
        "observation" | "function_call" => {
            return Err(RowError(format!("field \"{from_path}\": tool-calling turns ({from:?}) are not supported")))
        }
        other if answer => {
            return Err(RowError(format!("field \"{from_path}\": expected \"gpt\" for an answer, got {other:?}")))
        }
        other => {
            return Err(RowError(format!("field \"{from_path}\": unknown role {other:?} (expected human, gpt or system)")))
        }
    };
    Ok(Message::new(role, value))
}

/// Refuse a row with tool descriptions: a non-empty `tools` (string, list or object).
fn no_tools(obj: &Map<String, Value>) -> Result<(), RowError> {
    let empty = match obj.get("tools") {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.trim().is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(other) => return Err(wrong_type("tools", "a string, a list or an object", other)),
    };
    if empty {
        Ok(())
    } else {
        Err(RowError("field \"tools\": tool descriptions are not supported (ropo's messages carry no tools)".into()))
    }
}

/// An optional string field: absent or null is `None`, as is an empty string (axolotl's
/// `if sample["system"]`, LLaMA-Factory's empty `_system`).
fn optional_string<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, RowError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => Ok(Some(string(v, name)?).filter(|s| !s.is_empty())),
    }
}

/// `[system]` when there is a system prompt, else no message.
fn system_message(system: Option<&str>) -> Vec<Message> {
    system.filter(|s| !s.is_empty()).map(|s| Message::new("system", s)).into_iter().collect()
}

/// One answer string as an assistant turn.
fn answer_turn(obj: &Map<String, Value>, name: &str) -> Result<Vec<Message>, RowError> {
    Ok(vec![Message::new("assistant", string(field(obj, name)?, name)?)])
}

/// axolotl's single-turn DPO strategies (`chatml.py` / `llama3.py`: `argilla` (`default`), `icr`,
/// `intel`, `prompt_pairs`): optional `system`, the `prompt_key` string as the user turn, the
/// `chosen_key` / `rejected_key` strings as the assistant answers.
fn single_turn(obj: &Map<String, Value>, prompt_key: &str, chosen_key: &str, rejected_key: &str) -> Result<Normalized, RowError> {
    let prompt = system_user(obj, prompt_key)?;
    let chosen = answer_turn(obj, chosen_key)?;
    let rejected = answer_turn(obj, rejected_key)?;
    Ok(checked(Pair::Chat { prompt, chosen, rejected }))
}

/// `[system (optional `system`), user (the `key` string)]`.
fn system_user(obj: &Map<String, Value>, key: &str) -> Result<Vec<Message>, RowError> {
    let user = string(field(obj, key)?, key)?;
    let mut prompt = system_message(optional_string(obj, "system")?);
    prompt.push(Message::new("user", user));
    Ok(prompt)
}

/// LLaMA-Factory Alpaca preference rows (`AlpacaDatasetConverter`): optional `system`; each
/// `history` `[user, assistant]` pair as two turns; then one user turn, the non-empty of
/// `instruction` and `input` joined by `"\n"`; `chosen` / `rejected` strings as the answers.
fn alpaca(obj: &Map<String, Value>) -> Result<Normalized, RowError> {
    no_tools(obj)?;
    let mut prompt = system_message(optional_string(obj, "system")?);
    if let Some(h) = obj.get("history").filter(|h| !h.is_null()) {
        for (i, pair) in array(h, "history")?.iter().enumerate() {
            let path = format!("history[{i}]");
            match pair.as_array().map(Vec::as_slice) {
                Some([q, a]) => {
                    prompt.push(Message::new("user", string(q, &format!("{path}[0]"))?));
                    prompt.push(Message::new("assistant", string(a, &format!("{path}[1]"))?));
                }
                _ => return Err(wrong_type(&path, "a [prompt, response] pair", pair)),
            }
        }
    }
    let instruction = string(field(obj, "instruction")?, "instruction")?;
    let input = optional_string(obj, "input")?;
    let query: Vec<&str> = [Some(instruction), input].into_iter().flatten().filter(|s| !s.is_empty()).collect();
    prompt.push(Message::new("user", query.join("\n")));
    let chosen = answer_turn(obj, "chosen")?;
    let rejected = answer_turn(obj, "rejected")?;
    Ok(checked(Pair::Chat { prompt, chosen, rejected }))
}

/// axolotl `chat_template.default`: `messages` (a list, or a string for one user turn) is the
/// prompt; `chosen` / `rejected` are each a `{role, content}` message, a string (an assistant
/// turn) or a message list (its last message, as axolotl). LLaMA-Factory's OpenAI-style rows
/// read the same (its leading system message stays the first message).
fn chat_template(obj: &Map<String, Value>) -> Result<Normalized, RowError> {
    no_tools(obj)?;
    let prompt = match field(obj, "messages")? {
        Value::String(s) => vec![Message::new("user", s.as_str())],
        v => messages(v, "messages")?,
    };
    let chosen = one_answer(field(obj, "chosen")?, "chosen")?;
    let rejected = one_answer(field(obj, "rejected")?, "rejected")?;
    Ok(checked(Pair::Chat { prompt, chosen: vec![chosen], rejected: vec![rejected] }))
}

/// A `chat_template` answer: a string, a message, or a list of messages (the last one); it must
/// be an assistant message.
fn one_answer(v: &Value, path: &str) -> Result<Message, RowError> {
    let (m, at) = match v {
        Value::String(s) => return Ok(Message::new("assistant", s.as_str())),
        Value::Object(_) => (message(v, path)?, path.to_owned()),
        Value::Array(list) if !list.is_empty() => {
            let at = format!("{path}[{}]", list.len() - 1);
            (message(&list[list.len() - 1], &at)?, at)
        }
        Value::Array(_) => return Err(RowError(format!("field \"{path}\": expected at least one message, got an empty list"))),
        other => return Err(wrong_type(path, "a string, a message or a list of messages", other)),
    };
    if m.role != "assistant" {
        return Err(RowError(format!("field \"{at}.role\": an answer is an assistant message, got {:?}", m.role)));
    }
    Ok(m)
}

/// axolotl `chatml.ultra` / `llama3.ultra`: optional `system` and the `prompt` string are the
/// prompt; the answers are `chosen[1]` / `rejected[1]` of `[user, assistant]` lists (the user
/// turn repeats the prompt and is not used, as axolotl).
fn ultra(obj: &Map<String, Value>) -> Result<Normalized, RowError> {
    let prompt = system_user(obj, "prompt")?;
    let chosen = second_message(field(obj, "chosen")?, "chosen")?;
    let rejected = second_message(field(obj, "rejected")?, "rejected")?;
    Ok(checked(Pair::Chat { prompt, chosen: vec![chosen], rejected: vec![rejected] }))
}

fn second_message(v: &Value, path: &str) -> Result<Message, RowError> {
    let list = messages(v, path)?;
    if list.len() != 2 {
        return Err(RowError(format!("field \"{path}\": expected 2 messages [user, assistant], got {}", list.len())));
    }
    let m = list.into_iter().nth(1).unwrap_or_else(|| Message::new("", ""));
    if m.role != "assistant" {
        return Err(RowError(format!("field \"{path}[1].role\": an answer is an assistant message, got {:?}", m.role)));
    }
    Ok(m)
}

/// axolotl `zephyr.nectar` (berkeley-nest/Nectar): the `prompt` string is one user turn (as
/// axolotl, which writes it after an empty Zephyr system turn; the empty system message is left
/// out). Nectar ranks 1 as best: chosen is the best-ranked answer (lowest `rank`), rejected the
/// worst-ranked (highest; the first of equal ranks in both cases). Axolotl instead sorts by rank
/// and takes the last two (chosen = worst, rejected = second worst), which inverts Nectar's
/// ranking; ropo does not follow that.
fn nectar(obj: &Map<String, Value>) -> Result<Normalized, RowError> {
    let prompt = vec![Message::new("user", string(field(obj, "prompt")?, "prompt")?)];
    let answers = array(field(obj, "answers")?, "answers")?;
    let mut ranked = Vec::with_capacity(answers.len());
    for (i, a) in answers.iter().enumerate() {
        let path = format!("answers[{i}]");
        let a = object_field(a, &path)?;
        let (ap, rp) = (format!("{path}.answer"), format!("{path}.rank"));
        let text = string(a.get("answer").ok_or_else(|| missing(&ap))?, &ap)?;
        let rank_v = a.get("rank").ok_or_else(|| missing(&rp))?;
        let rank = rank_v.as_f64().ok_or_else(|| wrong_type(&rp, "a number", rank_v))?;
        ranked.push((rank, text));
    }
    let best = ranked.iter().fold(None::<&(f64, &str)>, |b, a| if b.is_none_or(|b| a.0 < b.0) { Some(a) } else { b });
    let worst = ranked.iter().fold(None::<&(f64, &str)>, |w, a| if w.is_none_or(|w| a.0 > w.0) { Some(a) } else { w });
    match (best, worst) {
        (Some(b), Some(w)) if b.0 < w.0 => Ok(checked(Pair::Chat {
            prompt,
            chosen: vec![Message::new("assistant", b.1)],
            rejected: vec![Message::new("assistant", w.1)],
        })),
        _ => Err(RowError(format!(
            "field \"answers\": expected at least two answers of different rank, got {} answer(s) and no preference",
            ranked.len()
        ))),
    }
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
    list.iter().enumerate().map(|(i, m)| message(m, &format!("{path}[{i}]"))).collect()
}

/// One `{role, content}` message at `path` (see [`messages`]).
fn message(m: &Value, p: &str) -> Result<Message, RowError> {
    let obj = object_field(m, p)?;
    let role_path = format!("{p}.role");
    let role = string(obj.get("role").ok_or_else(|| missing(&role_path))?, &role_path)?;
    if !ROLES.contains(&role) {
        return Err(RowError(format!("field \"{role_path}\": unknown role {role:?} (expected system, user or assistant)")));
    }
    let content_path = format!("{p}.content");
    let content = obj.get("content").ok_or_else(|| missing(&content_path))?;
    Ok(Message::new(role, content_text(content, &content_path)?))
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
        assert!(
            e.contains(
                "standard, implicit_prompt, conversational, openai, hh, sharegpt, alpaca, chat_template, axolotl_argilla, \
                 axolotl_icr, axolotl_intel, axolotl_prompt_pairs, axolotl_ultra, axolotl_nectar"
            ),
            "{e}"
        );
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
        assert_eq!(e.0, "field \"conversations[0].from\": tool-calling turns (\"observation\") are not supported");
    }

    /// LLaMA-Factory `SharegptDatasetConverter`: a leading system turn replaces the `system`
    /// column; turns alternate human, gpt, ... and end in a human turn; tools are refused.
    #[test]
    fn sharegpt_follows_llama_factory_turn_rules() {
        let ans = |v: &str| json!({"from": "gpt", "value": v});
        let row = json!({
            "system": "column",
            "conversations": [{"from": "system", "value": "turn"}, {"from": "human", "value": "q1"},
                              {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}],
            "chosen": ans("good"), "rejected": ans("bad"),
        });
        let want = chat(&[("system", "turn"), ("user", "q1"), ("assistant", "a1"), ("user", "q2")], "good", "bad");
        assert_eq!(normalize(Format::Sharegpt, &row).unwrap(), want);
        let row = json!({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], "chosen": ans("a"), "rejected": ans("b")});
        let e = normalize(Format::Sharegpt, &row).unwrap_err();
        assert_eq!(e.0, "field \"conversations[1].from\": expected \"gpt\" here (turns alternate human, gpt, ...), got \"human\"");
        let row = json!({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "chosen": ans("a"), "rejected": ans("b")});
        let e = normalize(Format::Sharegpt, &row).unwrap_err();
        assert!(e.0.starts_with("field \"conversations\": a preference conversation ends in a \"human\" turn"), "{e}");
        let row = json!({"conversations": [{"from": "human", "value": "q"}], "tools": "[{\"name\": \"f\"}]", "chosen": ans("a"), "rejected": ans("b")});
        assert!(normalize(Format::Sharegpt, &row).unwrap_err().0.starts_with("field \"tools\": tool descriptions are not supported"));
        let row = json!({"conversations": [{"from": "human", "value": "q"}], "system": null, "tools": "", "chosen": ans("a"), "rejected": ans("b")});
        assert_eq!(normalize(Format::Sharegpt, &row).unwrap(), chat(&[("user", "q")], "a", "b"));
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

    // ---- other trainers' layouts

    /// The first row of ../shared/data/orca_dpo_pairs (Intel/orca_dpo_pairs), shortened, in the
    /// layout Intel publishes it: `system`, `question`, `chosen`, `rejected`.
    fn orca_row() -> Value {
        json!({
            "system": "You are an AI assistant. User will you give you a task.",
            "question": "MM. Georges Colombier, Samad Seyidov (pour un rappel au R\u{e8}glement).\n\nTranslate to English",
            "chosen": "Step 1: Identify the names and phrases in the given text.",
            "rejected": "Sure, I'd be happy to help!",
        })
    }

    fn orca_pair() -> Normalized {
        chat(
            &[
                ("system", "You are an AI assistant. User will you give you a task."),
                ("user", "MM. Georges Colombier, Samad Seyidov (pour un rappel au R\u{e8}glement).\n\nTranslate to English"),
            ],
            "Step 1: Identify the names and phrases in the given text.",
            "Sure, I'd be happy to help!",
        )
    }

    #[test]
    fn detects_other_trainers_layouts() {
        let msg = |r: &str, c: &str| json!({"role": r, "content": c});
        let cases = [
            (json!({"instruction": "i", "input": "", "chosen": "a", "rejected": "b"}), Format::Alpaca),
            (json!({"instruction": "i", "chosen": "a", "rejected": "b", "history": []}), Format::Alpaca),
            (json!({"messages": [msg("user", "q")], "chosen": msg("assistant", "a"), "rejected": msg("assistant", "b")}), Format::ChatTemplate),
            (json!({"instruction": "i", "chosen_response": "a", "rejected_response": "b"}), Format::AxolotlArgilla),
            (json!({"system": "", "input": "q", "chosen": "a", "rejected": "b"}), Format::AxolotlIcr),
            (orca_row(), Format::AxolotlIntel),
            (json!({"prompt": "q", "chosen": [msg("user", "q"), msg("assistant", "a")], "rejected": []}), Format::AxolotlUltra),
            (json!({"prompt": "q", "answers": [{"answer": "a", "rank": 1}]}), Format::AxolotlNectar),
            // prompt_pairs has standard's keys: never detected
            (json!({"system": "s", "prompt": "q", "chosen": "a", "rejected": "b"}), Format::Standard),
            // HuggingFaceH4/ultrafeedback_binarized carries `messages` beside `prompt`: ultra, not chat_template
            (json!({"prompt": "q", "messages": [], "chosen": [], "rejected": []}), Format::AxolotlUltra),
        ];
        for (row, want) in cases {
            assert_eq!(detect(&row).unwrap(), want, "{row}");
        }
        // `question` / `messages` alone are no layout
        assert!(detect(&json!({"question": "q", "answer": "a"})).unwrap_err().0.starts_with("cannot detect"));
        assert!(detect(&json!({"messages": []})).unwrap_err().0.starts_with("cannot detect"));
    }

    #[test]
    fn axolotl_intel_is_system_then_question() {
        assert_eq!(normalize(Format::AxolotlIntel, &orca_row()).unwrap(), orca_pair());
        let mut row = orca_row();
        row["system"] = json!(null);
        let Normalized::Pair(Pair::Chat { prompt, .. }) = normalize(Format::AxolotlIntel, &row).unwrap() else { panic!() };
        assert_eq!(prompt.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["user"]);
        row.as_object_mut().unwrap().remove("question");
        assert_eq!(normalize(Format::AxolotlIntel, &row).unwrap_err().0, "missing field \"question\"");
        let mut row = orca_row();
        row["chosen"] = json!(null);
        assert_eq!(normalize(Format::AxolotlIntel, &row).unwrap_err().0, "field \"chosen\": expected a string, got null");
        row["chosen"] = json!("same");
        row["rejected"] = json!("same");
        assert_eq!(normalize(Format::AxolotlIntel, &row).unwrap(), Normalized::Skip(SkipReason::Identical));
    }

    #[test]
    fn axolotl_icr_argilla_and_prompt_pairs_are_one_turn() {
        let o = orca_row();
        let icr = json!({"system": o["system"], "input": o["question"], "chosen": o["chosen"], "rejected": o["rejected"]});
        assert_eq!(normalize(Format::AxolotlIcr, &icr).unwrap(), orca_pair());
        let argilla = json!({"system": o["system"], "instruction": o["question"], "chosen_response": o["chosen"], "rejected_response": o["rejected"]});
        assert_eq!(normalize(Format::AxolotlArgilla, &argilla).unwrap(), orca_pair());
        let pairs = json!({"system": o["system"], "prompt": o["question"], "chosen": o["chosen"], "rejected": o["rejected"]});
        assert_eq!(normalize(Format::AxolotlPromptPairs, &pairs).unwrap(), orca_pair());
        let e = normalize(Format::AxolotlArgilla, &json!({"instruction": "q", "chosen_response": "a"})).unwrap_err();
        assert_eq!(e.0, "missing field \"rejected_response\"");
        let e = normalize(Format::AxolotlIcr, &json!({"input": "q", "chosen": "a", "rejected": "b", "system": 1})).unwrap_err();
        assert_eq!(e.0, "field \"system\": expected a string, got a number");
        let e = normalize(Format::AxolotlPromptPairs, &json!({"prompt": ["q"], "chosen": "a", "rejected": "b"})).unwrap_err();
        assert_eq!(e.0, "field \"prompt\": expected a string, got a list");
        let e = normalize(Format::AxolotlIcr, &json!({"input": "q", "chosen": "", "rejected": "b"})).unwrap();
        assert_eq!(e, Normalized::Skip(SkipReason::EmptyChosen));
    }

    /// LLaMA-Factory `AlpacaDatasetConverter`: system, history pairs, then `instruction\ninput`.
    #[test]
    fn alpaca_joins_instruction_and_input_after_history() {
        let row = json!({
            "system": "Be brief.",
            "history": [["What is 2 plus 2?", "4."]],
            "instruction": "Translate to English",
            "input": "Bonjour",
            "chosen": "Hello",
            "rejected": "Goodbye",
        });
        let want = chat(
            &[("system", "Be brief."), ("user", "What is 2 plus 2?"), ("assistant", "4."), ("user", "Translate to English\nBonjour")],
            "Hello",
            "Goodbye",
        );
        assert_eq!(normalize(Format::Alpaca, &row).unwrap(), want);
        let row = json!({"instruction": "Say hi", "input": "", "chosen": "hi", "rejected": "no"});
        assert_eq!(normalize(Format::Alpaca, &row).unwrap(), chat(&[("user", "Say hi")], "hi", "no"));
        let e = normalize(Format::Alpaca, &json!({"input": "x", "chosen": "a", "rejected": "b"})).unwrap_err();
        assert_eq!(e.0, "missing field \"instruction\"");
        let e = normalize(Format::Alpaca, &json!({"instruction": "i", "history": [["q"]], "chosen": "a", "rejected": "b"})).unwrap_err();
        assert_eq!(e.0, "field \"history[0]\": expected a [prompt, response] pair, got a list");
        let e = normalize(Format::Alpaca, &json!({"instruction": "i", "history": [["q", null]], "chosen": "a", "rejected": "b"})).unwrap_err();
        assert_eq!(e.0, "field \"history[0][1]\": expected a string, got null");
    }

    #[test]
    fn chat_template_reads_messages_and_single_answers() {
        let row = json!({
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 17 plus 25?"}],
            "chosen": {"role": "assistant", "content": "42."},
            "rejected": {"role": "assistant", "content": "41."},
        });
        let want = chat(&[("system", "Be brief."), ("user", "What is 17 plus 25?")], "42.", "41.");
        assert_eq!(normalize(Format::ChatTemplate, &row).unwrap(), want);
        // axolotl: a string is an assistant turn, a list gives its last message; a string prompt is one user turn
        let row = json!({
            "messages": "What is 17 plus 25?",
            "chosen": "42.",
            "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "41."}],
        });
        assert_eq!(normalize(Format::ChatTemplate, &row).unwrap(), chat(&[("user", "What is 17 plus 25?")], "42.", "41."));
        let e = normalize(Format::ChatTemplate, &json!({"messages": [], "chosen": {"role": "user", "content": "a"}, "rejected": "b"})).unwrap_err();
        assert_eq!(e.0, "field \"chosen.role\": an answer is an assistant message, got \"user\"");
        let e = normalize(Format::ChatTemplate, &json!({"messages": [], "chosen": {"role": "assistant", "content": null}, "rejected": "b"})).unwrap_err();
        assert_eq!(e.0, "field \"chosen.content\": expected a string or a list of text parts, got null");
        let e = normalize(Format::ChatTemplate, &json!({"chosen": "a", "rejected": "b"})).unwrap_err();
        assert_eq!(e.0, "missing field \"messages\"");
        let e = normalize(Format::ChatTemplate, &json!({"messages": [{"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"})).unwrap_err();
        assert!(e.0.starts_with("field \"messages[0].role\": unknown role \"tool\""), "{e}");
    }

    #[test]
    fn axolotl_ultra_takes_the_second_message() {
        let row = json!({
            "prompt": "What is 17 plus 25?",
            "chosen": [{"role": "user", "content": "What is 17 plus 25?"}, {"role": "assistant", "content": "42."}],
            "rejected": [{"role": "user", "content": "What is 17 plus 25?"}, {"role": "assistant", "content": "41."}],
        });
        assert_eq!(normalize(Format::AxolotlUltra, &row).unwrap(), chat(&[("user", "What is 17 plus 25?")], "42.", "41."));
        let mut bad = row.clone();
        bad["rejected"] = json!([{"role": "user", "content": "q"}]);
        assert_eq!(normalize(Format::AxolotlUltra, &bad).unwrap_err().0, "field \"rejected\": expected 2 messages [user, assistant], got 1");
        bad["rejected"] = json!("41.");
        assert_eq!(normalize(Format::AxolotlUltra, &bad).unwrap_err().0, "field \"rejected\": expected a list of messages, got a string");
        bad["rejected"] = json!([{"role": "user", "content": "q"}, {"role": "user", "content": "r"}]);
        assert_eq!(normalize(Format::AxolotlUltra, &bad).unwrap_err().0, "field \"rejected[1].role\": an answer is an assistant message, got \"user\"");
        let mut bad = row;
        bad.as_object_mut().unwrap().remove("prompt");
        assert_eq!(normalize(Format::AxolotlUltra, &bad).unwrap_err().0, "missing field \"prompt\"");
    }

    /// Nectar ranks 1 as best: chosen is rank 1, rejected the highest rank.
    #[test]
    fn axolotl_nectar_pairs_best_with_worst() {
        let row = json!({
            "prompt": "\n\nHuman: What is 17 plus 25?\n\nAssistant: ",
            "answers": [
                {"answer": "41.", "model": "m2", "rank": 2.0},
                {"answer": "42.", "model": "m1", "rank": 1.0},
                {"answer": "I don't know.", "model": "m3", "rank": 3.0},
            ],
        });
        let want = chat(&[("user", "\n\nHuman: What is 17 plus 25?\n\nAssistant: ")], "42.", "I don't know.");
        assert_eq!(normalize(Format::AxolotlNectar, &row).unwrap(), want);
        let e = normalize(Format::AxolotlNectar, &json!({"prompt": "q", "answers": [{"answer": "a", "rank": 1}]})).unwrap_err();
        assert!(e.0.starts_with("field \"answers\": expected at least two answers of different rank"), "{e}");
        let e = normalize(Format::AxolotlNectar, &json!({"prompt": "q", "answers": [{"answer": "a"}]})).unwrap_err();
        assert_eq!(e.0, "missing field \"answers[0].rank\"");
        let e = normalize(Format::AxolotlNectar, &json!({"prompt": "q", "answers": [{"answer": "a", "rank": "1"}]})).unwrap_err();
        assert_eq!(e.0, "field \"answers[0].rank\": expected a number, got a string");
    }
}
