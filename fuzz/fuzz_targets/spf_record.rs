#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailwarden::fuzzing::spf_record(data));
