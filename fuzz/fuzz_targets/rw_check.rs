//! Open read-write, scripted reads/writes/zero writes/discards/flushes, close, then check and repair
//! of an arbitrary image on the memory backend; the header must survive every write.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qcow2::fuzzing::rw_check(data));
