//! Header, extension and backing-name parsing of the first cluster of an image.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2::fuzzing::header(data));
