#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailwarden::fuzzing::session(data));
