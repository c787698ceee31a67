//! The CLI's `-o key=value,...` option parser and size parser on arbitrary strings.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2_cli::fuzzing::opts(data));
