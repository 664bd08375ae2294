//! Arbitrary bytes as the main channel of a UNIX-socket migration: the destination answers
//! on the return path (handshake reply, SWITCHOVER_ACK, READY, ERROR) while it parses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    baton_migration_fuzz::run_unix(data);
});
