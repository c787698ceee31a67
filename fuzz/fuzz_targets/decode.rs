//! L1, L2 (standard and extended), compressed descriptor, refcount block and snapshot table decoding
//! and their round trips through the encoders.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2::fuzzing::decode(data));
