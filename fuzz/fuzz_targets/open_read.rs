//! Opening an arbitrary byte image on the memory backend and reading it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2::fuzzing::open_read(data));
