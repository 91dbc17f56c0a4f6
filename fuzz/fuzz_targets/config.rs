//! The TOML run-config parser: any text gives a config or an error, never a panic; a parsed
//! config validates or fails with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = ropo::config::RunConfig::from_toml_str(text, std::path::Path::new("f.toml")) {
        let _ = cfg.validate();
        let _ = cfg.with_overrides(&["training.beta=0.2".to_string()]);
    }
});
