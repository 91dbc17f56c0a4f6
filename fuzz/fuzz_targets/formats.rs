//! Row-format detection and normalisation of every format, through the loader: any bytes give
//! rows or an error naming the file (and line), never a panic; every row read is kept or counted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ropo::data::formats::{self, Format};
use ropo::data::{parse_reader, LoadOptions};

fuzz_target!(|data: &[u8]| {
    for name in ["f.jsonl", "f.json"] {
        for format in std::iter::once(None).chain(Format::ALL.into_iter().map(Some)) {
            let opts = LoadOptions { format, ..Default::default() };
            match parse_reader(data, name, &opts) {
                Ok(l) => assert_eq!(l.examples.len() + l.report.total_skipped(), l.report.rows_read, "every row kept or counted"),
                Err(e) => assert!(e.to_string().starts_with(name), "error without the file: {e}"),
            }
        }
    }
    // detection and normalisation straight from a JSON value
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(f) = formats::detect(&v) {
            let _ = formats::normalize(f, &v);
        }
        for f in Format::ALL {
            let _ = formats::normalize(f, &v);
        }
    }
});
