//! Reading Parquet preference files (the Hub's storage format) into the same JSON rows the
//! `.jsonl` route reads, so every row format of [`super::formats`] works on either.
//!
//! The file is read through the Apache Arrow reader of the `parquet` crate
//! ([`ParquetRecordBatchReaderBuilder`]), one row group at a time (record batches of at most
//! [`BATCH_ROWS`] rows): memory holds one batch of decoded columns, not the file. Arrow values
//! become JSON as `datasets`' `Dataset.to_list()` returns them: strings, numbers and booleans as
//! themselves, lists (`List`, `LargeList`, `FixedSizeList`) as arrays, structs as objects (the
//! OpenAI layout's `input.messages` and lists of `{role, content}` structs), dictionary-encoded
//! columns as their values, `Binary` holding UTF-8 as strings. Two differences, both documented
//! to users: a null struct field or column reads as an absent key (an Arrow struct has every
//! field in every row, where a JSON object may leave one out), and a value of a type no row
//! format reads (dates, decimals, non-UTF-8 binary, ...) reads as absent too; an error about a
//! field then names the column's Arrow type.

use std::collections::BTreeMap;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type,
    UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Rows a record batch holds at most (a row group is read in batches of this size).
pub const BATCH_ROWS: usize = 1024;

/// Where a row is in a Parquet file: its 1-based row number in the file, and its row group
/// (0-based, as `pyarrow.parquet.ParquetFile.read_row_group` numbers them) with its 1-based row
/// within the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowAt {
    /// 1-based row of the file.
    pub row: usize,
    /// 0-based row group.
    pub group: usize,
    /// 1-based row within the row group.
    pub in_group: usize,
}

impl std::fmt::Display for RowAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "row {} (row group {}, row {})", self.row, self.group, self.in_group)
    }
}

/// The top-level columns of a Parquet file with their Arrow types, for error messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns(pub BTreeMap<String, DataType>);

impl Columns {
    /// A note for a row error `msg` naming a field (`field "chosen[0].content": ...`, `missing
    /// field "rejected"`): the Arrow type of its top-level column, or that the column is null
    /// in this row. Empty when the message names no column of the file.
    pub fn hint(&self, msg: &str) -> String {
        let Some(start) = msg.find("field \"").map(|k| k + 7) else { return String::new() };
        let path = &msg[start..];
        let end = path.find(['"', '.', '[']).unwrap_or(path.len());
        let column = &path[..end];
        let whole_column = msg.starts_with("missing field") && !path[end..].starts_with(['.', '[']);
        match self.0.get(column) {
            None => String::new(),
            Some(t) if !readable(t) => format!(" (Parquet column {column:?} has type {t}, which no row format reads)"),
            Some(t @ (DataType::Binary | DataType::LargeBinary | DataType::BinaryView)) if whole_column => {
                format!(" (Parquet column {column:?} has type {t}: null or not UTF-8 in this row)")
            }
            Some(t) if whole_column => format!(" (Parquet column {column:?}, of type {t}, is null in this row)"),
            Some(t) => format!(" (Parquet column {column:?} has type {t})"),
        }
    }
}

/// Whether [`values`] reads values of type `t` (else it reads them as absent).
pub fn readable(t: &DataType) -> bool {
    match t {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => readable(f.data_type()),
        DataType::Struct(fields) => fields.iter().all(|f| readable(f.data_type())),
        DataType::Dictionary(_, v) => readable(v),
        t => t.is_null() || *t == DataType::Boolean || t.is_integer() || t.is_floating() || STRINGS.contains(t),
    }
}

const STRINGS: [DataType; 6] =
    [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View, DataType::Binary, DataType::LargeBinary, DataType::BinaryView];

fn open(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<std::fs::File>> {
    let file = std::fs::File::open(path).map_err(|e| Error::input(path, None, format!("cannot open: {e}")))?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::input(path, None, format!("not a readable Parquet file: {e}")))
}

/// The top-level columns of the Parquet file at `path` (its footer only is read).
///
/// Errors: as [`for_each_row`].
pub fn columns(path: &Path) -> Result<Columns> {
    let builder = open(path)?;
    Ok(Columns(builder.schema().fields().iter().map(|f| (f.name().clone(), f.data_type().clone())).collect()))
}

/// Read the Parquet file at `path` row group by row group, calling `each` with every row (a JSON
/// object, columns as keys) and where it is. `each`'s errors stop the reading and are returned.
///
/// Errors (naming `path`): the file cannot be opened, is not Parquet, or a page cannot be decoded
/// (a corrupt page, a codec this build lacks; with the row group).
pub fn for_each_row(path: &Path, mut each: impl FnMut(RowAt, Value) -> Result<()>) -> Result<()> {
    let bad = |msg: String| Error::input(path, None, msg);
    let builder = open(path)?;
    let group_rows: Vec<usize> = builder.metadata().row_groups().iter().map(|g| g.num_rows().max(0) as usize).collect();
    let reader = builder.with_batch_size(BATCH_ROWS).build().map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut at = Cursor { group_rows, group: 0, in_group: 0, row: 0 };
    for batch in reader {
        let batch = batch.map_err(|e| bad(format!("row group {}: cannot decode: {e}", at.next_group())))?;
        for row in batch_rows(&batch) {
            each(at.next(), row)?;
        }
    }
    Ok(())
}

/// Counts rows through the row groups (the reader yields them in file order).
struct Cursor {
    group_rows: Vec<usize>,
    group: usize,
    in_group: usize,
    row: usize,
}

impl Cursor {
    /// The row group the next row is in.
    fn next_group(&self) -> usize {
        let mut g = self.group;
        let mut in_group = self.in_group;
        while g < self.group_rows.len() && in_group >= self.group_rows[g] {
            g += 1;
            in_group = 0;
        }
        g
    }

    fn next(&mut self) -> RowAt {
        let g = self.next_group();
        if g != self.group {
            self.group = g;
            self.in_group = 0;
        }
        self.in_group += 1;
        self.row += 1;
        RowAt { row: self.row, group: self.group, in_group: self.in_group }
    }
}

/// The rows of a record batch as JSON objects (null columns left out).
pub fn batch_rows(batch: &RecordBatch) -> Vec<Value> {
    let mut rows = vec![Map::new(); batch.num_rows()];
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        for (row, v) in rows.iter_mut().zip(values(column.as_ref())) {
            if !v.is_null() {
                row.insert(field.name().clone(), v);
            }
        }
    }
    rows.into_iter().map(Value::Object).collect()
}

/// Every element of `a` as JSON, column-wise (children converted once, not per row); nulls and
/// values of unread types as [`Value::Null`].
pub fn values(a: &dyn Array) -> Vec<Value> {
    let n = a.len();
    let mut out: Vec<Value> = match a.data_type() {
        DataType::Boolean => a.as_boolean().iter().map(|v| v.map_or(Value::Null, Value::Bool)).collect(),
        DataType::Utf8 => strings(a.as_string::<i32>().iter()),
        DataType::LargeUtf8 => strings(a.as_string::<i64>().iter()),
        DataType::Utf8View => strings(a.as_string_view().iter()),
        DataType::Binary => binaries(a.as_binary::<i32>().iter()),
        DataType::LargeBinary => binaries(a.as_binary::<i64>().iter()),
        DataType::BinaryView => binaries(a.as_binary_view().iter()),
        DataType::Int8 => numbers(a.as_primitive::<Int8Type>().iter()),
        DataType::Int16 => numbers(a.as_primitive::<Int16Type>().iter()),
        DataType::Int32 => numbers(a.as_primitive::<Int32Type>().iter()),
        DataType::Int64 => numbers(a.as_primitive::<Int64Type>().iter()),
        DataType::UInt8 => numbers(a.as_primitive::<UInt8Type>().iter()),
        DataType::UInt16 => numbers(a.as_primitive::<UInt16Type>().iter()),
        DataType::UInt32 => numbers(a.as_primitive::<UInt32Type>().iter()),
        DataType::UInt64 => numbers(a.as_primitive::<UInt64Type>().iter()),
        DataType::Float16 => floats(a.as_primitive::<Float16Type>().iter().map(|v| v.map(f64::from))),
        DataType::Float32 => floats(a.as_primitive::<Float32Type>().iter().map(|v| v.map(f64::from))),
        DataType::Float64 => floats(a.as_primitive::<Float64Type>().iter()),
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            lists(&values(l.values().as_ref()), l.value_offsets().windows(2).map(|w| (w[0] as usize, w[1] as usize)))
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>();
            lists(&values(l.values().as_ref()), l.value_offsets().windows(2).map(|w| (w[0] as usize, w[1] as usize)))
        }
        DataType::FixedSizeList(_, k) => {
            let l = a.as_fixed_size_list();
            let k = (*k).max(0) as usize;
            lists(&values(l.values().as_ref()), (0..n).map(|i| (l.value_offset(i) as usize, l.value_offset(i) as usize + k)))
        }
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut objs = vec![Map::new(); n];
            for (f, c) in fields.iter().zip(s.columns()) {
                for (o, v) in objs.iter_mut().zip(values(c.as_ref())) {
                    if !v.is_null() {
                        o.insert(f.name().clone(), v);
                    }
                }
            }
            objs.into_iter().map(Value::Object).collect()
        }
        DataType::Dictionary(_, _) => {
            let d = a.as_any_dictionary();
            let vals = values(d.values().as_ref());
            d.normalized_keys().into_iter().map(|k| vals.get(k).cloned().unwrap_or(Value::Null)).collect()
        }
        _ => vec![Value::Null; n],
    };
    for (i, v) in out.iter_mut().enumerate() {
        if a.is_null(i) {
            *v = Value::Null;
        }
    }
    out
}

fn strings<'a>(it: impl Iterator<Item = Option<&'a str>>) -> Vec<Value> {
    it.map(|v| v.map_or(Value::Null, |s| Value::String(s.to_string()))).collect()
}

fn binaries<'a>(it: impl Iterator<Item = Option<&'a [u8]>>) -> Vec<Value> {
    it.map(|v| v.and_then(|b| std::str::from_utf8(b).ok()).map_or(Value::Null, |s| Value::String(s.to_string()))).collect()
}

fn numbers<T: Into<serde_json::Number>>(it: impl Iterator<Item = Option<T>>) -> Vec<Value> {
    it.map(|v| v.map_or(Value::Null, |x| Value::Number(x.into()))).collect()
}

fn floats(it: impl Iterator<Item = Option<f64>>) -> Vec<Value> {
    it.map(|v| v.and_then(serde_json::Number::from_f64).map_or(Value::Null, Value::Number)).collect()
}

/// Arrays of `child[start..end]` for each `(start, end)`.
fn lists(child: &[Value], ranges: impl Iterator<Item = (usize, usize)>) -> Vec<Value> {
    ranges.map(|(s, e)| Value::Array(child.get(s..e).map(<[Value]>::to_vec).unwrap_or_default())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, StringBuilder, StructBuilder};
    use arrow_array::{ArrayRef, Int64Array, StringArray};
    use arrow_schema::{Field, Fields};

    #[test]
    fn strings_numbers_and_nulls() {
        let a = StringArray::from(vec![Some("a"), None]);
        assert_eq!(values(&a), vec![Value::from("a"), Value::Null]);
        let n = Int64Array::from(vec![Some(3), None]);
        assert_eq!(values(&n), vec![Value::from(3), Value::Null]);
    }

    #[test]
    fn a_list_of_structs_reads_as_messages_and_null_fields_as_absent() {
        let fields = Fields::from(vec![Field::new("role", DataType::Utf8, true), Field::new("content", DataType::Utf8, true)]);
        let mut b = ListBuilder::new(StructBuilder::from_fields(fields, 0));
        for (role, content) in [(Some("user"), Some("hi")), (Some("assistant"), None)] {
            let s = b.values();
            s.field_builder::<StringBuilder>(0).unwrap().append_option(role);
            s.field_builder::<StringBuilder>(1).unwrap().append_option(content);
            s.append(true);
        }
        b.append(true);
        b.append(false);
        let list: ArrayRef = Arc::new(b.finish());
        let got = values(list.as_ref());
        assert_eq!(got[0], serde_json::json!([{"role": "user", "content": "hi"}, {"role": "assistant"}]));
        assert_eq!(got[1], Value::Null);
    }

    #[test]
    fn a_sliced_list_keeps_its_offsets() {
        let mut b = ListBuilder::new(StringBuilder::new());
        for row in [vec!["a"], vec!["b", "c"], vec!["d"]] {
            for s in row {
                b.values().append_value(s);
            }
            b.append(true);
        }
        let list = b.finish().slice(1, 2);
        assert_eq!(values(&list), vec![serde_json::json!(["b", "c"]), serde_json::json!(["d"])]);
    }

    #[test]
    fn hints_name_the_column_type() {
        let c = Columns([("chosen".to_string(), DataType::Int64), ("rejected".to_string(), DataType::Utf8)].into());
        assert_eq!(c.hint("field \"chosen\": expected a string, got 3"), " (Parquet column \"chosen\" has type Int64)");
        assert_eq!(c.hint("missing field \"rejected\""), " (Parquet column \"rejected\", of type Utf8, is null in this row)");
        assert_eq!(c.hint("missing field \"prompt\""), "");
        let c = Columns([("chosen".to_string(), DataType::Date32), ("rejected".to_string(), DataType::Binary)].into());
        assert_eq!(c.hint("missing field \"chosen\""), " (Parquet column \"chosen\" has type Date32, which no row format reads)");
        assert_eq!(c.hint("missing field \"rejected\""), " (Parquet column \"rejected\" has type Binary: null or not UTF-8 in this row)");
        assert!(readable(&DataType::Float16) && !readable(&DataType::Decimal128(10, 2)));
    }
}
