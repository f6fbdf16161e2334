//! Arbitrary text as a config file (`lanpush serve --config FILE`, `lanpush config --check`, a
//! SIGHUP reload): parsing and validation must never panic, whatever the TOML holds; a config
//! that parses must give a reload plan against the defaults and against itself (the SIGHUP path)
//! without panicking, and reloading it onto itself must need no restart.
#![no_main]

use lanpush::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(config) = Config::from_toml_str(text, "fuzz.toml") else {
        return;
    };
    let _ = config.reactor_threads();
    let _ = Config::default().reload_plan(&config);
    let same = config.reload_plan(&config);
    assert!(
        same.needs_restart.is_empty(),
        "a config reloaded onto itself needs no restart: {:?}",
        same.needs_restart
    );
});
