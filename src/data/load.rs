//! Reading preference files: `.jsonl` (one row a line) or `.json` (an array of rows), either
//! of them gzip-compressed, and `.parquet` ([`super::parquet`]); format detection per row then
//! per file; counted skips.
//!
//! [`load`] opens the file and hands JSON to [`parse_reader`], so tests feed bytes (ripgrep's
//! `parse` / `parse_reader` split). Errors name the file and line (and column for JSON syntax):
//! `data/train.jsonl:17: missing field "rejected"`; in a Parquet file the row, its row group and
//! the column's type: `train.parquet: row 17 (row group 0, row 17): field "chosen": expected a
//! string or a list of messages, got 3 (Parquet column "chosen" has type Int64)`.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::formats::{self, Format, Normalized};
use super::parquet::{self, Columns, RowAt};
use super::{DataReport, PreferenceExample, SkipReason};
use crate::error::{Error, Result};

/// What to do with a row whose chosen equals its rejected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnIdentical {
    /// Leave the row out and count it ([`SkipReason::Identical`]).
    #[default]
    Skip,
    /// Fail with `file:line: chosen is identical to rejected`.
    Error,
}

/// How to read a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Force a row format; `None` detects it per row, and every row must agree with the first.
    pub format: Option<Format>,
    /// What to do with identical chosen/rejected.
    pub on_identical: OnIdentical,
}

/// A loaded file: its format, the usable pairs in file order, and what was left out.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file (or the name given to [`parse_reader`]).
    pub source: PathBuf,
    /// The format of the rows (detected or forced).
    pub format: Format,
    /// The usable pairs, in file order.
    pub examples: Vec<PreferenceExample>,
    /// Rows read and rows skipped, by reason.
    pub report: DataReport,
}

/// Read the preference file at `path`: Parquet when its name ends in `.parquet` ([`load_parquet`]),
/// else JSON ([`parse_reader`]).
///
/// Errors: the file cannot be opened, plus everything [`parse_reader`] / [`load_parquet`] report.
pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Loaded> {
    let path = path.as_ref();
    if is_parquet(path) {
        return load_parquet(path, opts);
    }
    let file = std::fs::File::open(path).map_err(|e| Error::input(path, None, format!("cannot open: {e}")))?;
    parse_reader(std::io::BufReader::new(file), path, opts)
}

/// Read every file a spec names ([`super::sources::resolve`] with `split`) as one [`Loaded`]:
/// one file as [`load`]; several (a glob, a Hub split's shards) concatenated in order, `source`
/// then being the spec, `format` the first file's, each example's line that of its own file.
///
/// Errors: as [`super::sources::resolve`] and [`load`].
pub fn load_spec(spec: &str, split: &str, opts: &LoadOptions) -> Result<Loaded> {
    let mut files = super::sources::resolve(spec, split)?.into_iter();
    let first = files.next().ok_or_else(|| Error::input(spec, None, "no file"))?;
    let mut all = load(&first, opts)?;
    for path in files {
        let next = load(&path, opts)?;
        all.examples.extend(next.examples);
        all.report.absorb(next.report);
        all.source = PathBuf::from(spec);
    }
    Ok(all)
}

/// True when the file name ends in `.parquet` (any case).
pub fn is_parquet(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// Read a Parquet preference file row group by row group ([`parquet::for_each_row`]); each row's
/// [`PreferenceExample::line`] is its 1-based row number in the file.
///
/// Errors: as [`parquet::for_each_row`]; row errors as [`parse_reader`]'s, located by row and row
/// group instead of line and naming the Arrow type of the column involved; an empty file.
pub fn load_parquet(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let mut out = Rows::new(path, opts);
    // the schema is known before the first row: read it for the hints first
    out.columns = parquet::columns(path)?;
    parquet::for_each_row(path, |at, row| out.add(At::Row(at), &row))?;
    out.finish()
}

/// Parse preference rows from `reader`; `source` names it in errors (and its extension tells a
/// `.json` file from a `.jsonl` one; the content decides too: gzip magic bytes, a leading `[`).
///
/// Errors (all name `source`, and the line where there is one): unreadable input, corrupt gzip
/// data, invalid UTF-8 (`file:line:column`), an empty file, malformed JSON (`file:line:column`),
/// an undetectable row, a file mixing formats (the first odd line), a missing field or a field
/// of the wrong type (named), identical chosen/rejected with [`OnIdentical::Error`].
pub fn parse_reader<R: Read>(mut reader: R, source: impl AsRef<Path>, opts: &LoadOptions) -> Result<Loaded> {
    let source = source.as_ref();
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).map_err(|e| Error::input(source, None, format!("cannot read: {e}")))?;
    let bytes = gunzip(bytes, source)?;
    let text = utf8(&bytes, source)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(Error::input(source, None, "empty file: no rows"));
    }

    let mut out = Rows::new(source, opts);
    if is_json_array(text, source)? {
        let (rows, lines) = json_array(text, source)?;
        for (row, line) in rows.into_iter().zip(lines) {
            out.add(At::Line(line), &row)?;
        }
    } else {
        for (i, line) in text.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            let row: Value = serde_json::from_str(line).map_err(|e| json_error(source, i + e.line(), e))?;
            out.add(At::Line(i + 1), &row)?;
        }
    }
    out.finish()
}

/// Where a row is: a line of a JSON file, or a row of a Parquet file.
#[derive(Debug, Clone, Copy)]
enum At {
    Line(usize),
    Row(RowAt),
}

impl At {
    /// The 1-based line or row number ([`PreferenceExample::line`]).
    fn number(self) -> usize {
        match self {
            At::Line(l) => l,
            At::Row(r) => r.row,
        }
    }
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::Line(l) => write!(f, "line {l}"),
            At::Row(r) => write!(f, "{r}"),
        }
    }
}

/// The rows seen so far and the file's format (with the row it was detected from).
struct Rows<'a> {
    source: &'a Path,
    opts: &'a LoadOptions,
    format: Option<(Format, At)>,
    examples: Vec<PreferenceExample>,
    report: DataReport,
    /// A Parquet file's columns (for the type hints of row errors); empty for JSON.
    columns: Columns,
}

impl<'a> Rows<'a> {
    fn new(source: &'a Path, opts: &'a LoadOptions) -> Self {
        let format = opts.format.map(|f| (f, At::Line(0)));
        Rows { source, opts, format, examples: Vec::new(), report: DataReport::default(), columns: Columns::default() }
    }

    fn finish(self) -> Result<Loaded> {
        let format = match self.format {
            Some((f, _)) => f,
            None => return Err(Error::input(self.source, None, "empty file: no rows")),
        };
        Ok(Loaded { source: self.source.to_path_buf(), format, examples: self.examples, report: self.report })
    }

    fn add(&mut self, at: At, row: &Value) -> Result<()> {
        let line = at.number();
        let err = |msg: String| row_error(self.source, &self.columns, at, msg);
        self.report.rows_read += 1;
        let format = match (self.opts.format, self.format) {
            (Some(forced), _) => forced,
            (None, first) => {
                let detected = formats::detect(row).map_err(|e| err(e.0))?;
                match first {
                    None => {
                        self.format = Some((detected, at));
                        detected
                    }
                    Some((f, first)) if f != detected => {
                        return Err(err(format!(
                            "row is in format {detected}, but the file's format is {f} (detected from {first}); a \
                             file must not mix formats (or force one with --format)"
                        )))
                    }
                    Some((f, _)) => f,
                }
            }
        };
        match formats::normalize(format, row).map_err(|e| err(e.0))? {
            Normalized::Pair(pair) => self.examples.push(PreferenceExample { line, pair }),
            Normalized::Skip(SkipReason::Identical) if self.opts.on_identical == OnIdentical::Error => {
                return Err(err("chosen is identical to rejected (on_identical = \"skip\" skips such rows)".into()))
            }
            Normalized::Skip(reason) => self.report.skip(reason, line),
        }
        Ok(())
    }
}

/// `file:line: msg`, or `file: row R (row group G, row r): msg (column type)` for Parquet.
fn row_error(source: &Path, columns: &Columns, at: At, msg: String) -> Error {
    match at {
        At::Line(line) => Error::input(source, Some(line), msg),
        At::Row(r) => Error::input(source, None, format!("{r}: {msg}{}", columns.hint(&msg))),
    }
}

/// Decompress gzip data (detected by its magic bytes); a `.gz` name without them is an error.
fn gunzip(bytes: Vec<u8>, source: &Path) -> Result<Vec<u8>> {
    let named_gz = source.extension().is_some_and(|e| e == "gz");
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::input(source, None, format!("corrupt gzip data: {e}")))?;
        Ok(out)
    } else if named_gz && !bytes.is_empty() {
        Err(Error::input(source, None, "corrupt gzip data: no gzip header (the name ends in .gz)"))
    } else {
        Ok(bytes)
    }
}

/// The bytes as UTF-8, or `file:line:column: invalid UTF-8` (column in bytes).
fn utf8<'a>(bytes: &'a [u8], source: &Path) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        let good = &bytes[..e.valid_up_to()];
        let line = 1 + good.iter().filter(|&&b| b == b'\n').count();
        let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        Error::input_at(source, line, e.valid_up_to() - line_start + 1, "invalid UTF-8")
    })
}

/// True when the text is a JSON array (first non-blank character `[`). A `.json` file holding a
/// single multi-line object is an error.
fn is_json_array(text: &str, source: &Path) -> Result<bool> {
    let first = text.trim_start().chars().next();
    let stem_ext = {
        let name = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let name = name.strip_suffix(".gz").unwrap_or(&name).to_string();
        Path::new(&name).extension().map(|e| e.to_string_lossy().into_owned())
    };
    if first == Some('{') && stem_ext.as_deref() == Some("json") && text.trim().contains('\n') {
        if let Ok(Value::Object(_)) = serde_json::from_str::<Value>(text) {
            return Err(Error::input(source, None, "a .json file must hold an array of rows, got one object"));
        }
    }
    Ok(first == Some('['))
}

/// Parse a JSON array of rows; returns the rows and the 1-based line where each starts.
fn json_array(text: &str, source: &Path) -> Result<(Vec<Value>, Vec<usize>)> {
    let rows = match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(rows)) => rows,
        Ok(_) => return Err(Error::input(source, None, "expected a JSON array of rows")),
        Err(e) => return Err(json_error(source, e.line(), e)),
    };
    let lines = element_lines(text);
    // element_lines re-scans text that just parsed; the fallback (line 1) cannot happen.
    let lines = if lines.len() == rows.len() { lines } else { vec![1; rows.len()] };
    Ok((rows, lines))
}

/// The line on which each top-level element of a (valid) JSON array starts.
fn element_lines(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let skip_ws = |mut p: usize| {
        while p < bytes.len() && bytes[p].is_ascii_whitespace() {
            p += 1;
        }
        p
    };
    let mut lines = Vec::new();
    let mut pos = skip_ws(0) + 1; // after '['
    let (mut line, mut counted) = (1, 0);
    loop {
        pos = skip_ws(pos);
        if pos >= bytes.len() || bytes[pos] == b']' {
            break;
        }
        line += bytes[counted..pos].iter().filter(|&&b| b == b'\n').count();
        counted = pos;
        lines.push(line);
        let mut it = serde_json::Deserializer::from_str(&text[pos..]).into_iter::<serde::de::IgnoredAny>();
        match it.next() {
            Some(Ok(_)) => pos += it.byte_offset(),
            _ => break,
        }
        pos = skip_ws(pos);
        if pos < bytes.len() && bytes[pos] == b',' {
            pos += 1;
        }
    }
    lines
}

/// `file:line:column: invalid JSON: <serde_json's message without its position>`.
fn json_error(source: &Path, line: usize, e: serde_json::Error) -> Error {
    let msg = e.to_string();
    let msg = msg.rfind(" at line ").map_or(msg.as_str(), |k| &msg[..k]);
    Error::input_at(source, line, e.column(), format!("invalid JSON: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8], name: &str) -> Result<Loaded> {
        parse_reader(bytes, name, &LoadOptions::default())
    }

    #[test]
    fn json_array_rows_carry_their_lines() {
        let text = "[\n  {\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"},\n\n  {\"prompt\": \"p\",\n   \"chosen\": \"c\", \"rejected\": \"d\"}\n]\n";
        let got = parse(text.as_bytes(), "x.json").unwrap();
        assert_eq!(got.format, Format::Standard);
        assert_eq!(got.examples.iter().map(|e| e.line).collect::<Vec<_>>(), vec![2, 4]);
        // the same element, one line: the missing field is reported on line 4
        let text = "[\n  {\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"},\n\n  {\"prompt\": \"p\", \"chosen\": \"c\"}\n]";
        let e = parse(text.as_bytes(), "x.json").unwrap_err().to_string();
        assert_eq!(e, "x.json:4: missing field \"rejected\"");
    }

    #[test]
    fn jsonl_skips_blank_lines_and_crlf() {
        let text = "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\r\n\r\n{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"a\"}\r\n";
        let got = parse(text.as_bytes(), "x.jsonl").unwrap();
        assert_eq!(got.examples.len(), 1);
        assert_eq!(got.report.rows_read, 2);
        assert_eq!(got.report.skipped[&SkipReason::Identical].first_lines, vec![3]);
    }

    #[test]
    fn gzip_is_detected_by_magic_bytes() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"{\"chosen\": \"x a\", \"rejected\": \"x b\"}\n").unwrap();
        let gz = enc.finish().unwrap();
        let got = parse(&gz, "rows.jsonl.gz").unwrap();
        assert_eq!(got.format, Format::ImplicitPrompt);
        assert_eq!(got.examples.len(), 1);
    }

    #[test]
    fn single_object_json_file_is_an_error() {
        let e = parse(b"{\n\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"\n}", "x.json").unwrap_err().to_string();
        assert_eq!(e, "x.json: a .json file must hold an array of rows, got one object");
    }
}
