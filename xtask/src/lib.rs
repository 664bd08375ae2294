//! baton's developer tasks, as a library so that tests can call them directly
//! (baton-vmm's KVM test builds the harness guest through [`guest::build`] instead of
//! shelling out to `cargo xtask`, which would contend for the outer build's lock).
//!
//! Layout of what the tasks produce, under the cargo target directory (honouring
//! `CARGO_TARGET_DIR`):
//! * `guest/baton-guest.elf` — the harness guest image ([`guest::elf_path`]).
//! * `guest/build/` — the guest's own cargo target directory.
//! * `qemu/` — QEMU 7.2 unpacked from Debian packages ([`qemu`]).
//! * `bench/live-update.json` — the numbers of `cargo xtask bench live-update` ([`bench`]).

pub mod bench;
pub mod bench_net;
pub mod demo;
pub mod guest;
pub mod qemu;

use std::path::{Path, PathBuf};

/// Errors of the tasks: what was being done, and why it failed.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Builds an [`Error`] from a format string.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => { $crate::Error(format!($($arg)*)) };
}

/// The repository root (the parent of this crate's folder).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// The cargo target directory: `CARGO_TARGET_DIR` if set (relative to the current
/// directory, as cargo reads it), else `<repo>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir().map(|c| c.join(&dir)).unwrap_or(dir)
            }
        }
        _ => repo_root().join("target"),
    }
}

/// Runs a command to completion, failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut std::process::Command) -> Result<std::process::Output> {
    let out = cmd.output().map_err(|e| err!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(err!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}
