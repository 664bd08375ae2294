//! Arbitrary bytes as a snapshot file into the destination: channel header, handshake,
//! every section parser. `BATON_FUZZ_WRITE_SEEDS=DIR` writes valid streams there first.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        if let Ok(dir) = std::env::var("BATON_FUZZ_WRITE_SEEDS") {
            let (snap, remote) = baton_migration_fuzz::valid_streams();
            std::fs::create_dir_all(&dir).expect("seed dir");
            std::fs::write(format!("{dir}/snapshot"), snap).expect("seed");
            std::fs::write(format!("{dir}/remote-main"), remote).expect("seed");
        }
    },
    |data: &[u8]| {
        baton_migration_fuzz::run_file(data);
    }
);
