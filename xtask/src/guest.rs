//! Building the harness guest (`tests/guest`) into `<target>/guest/baton-guest.elf`.
//!
//! The guest is a separate cargo workspace built for the host target as bare metal.
//! Its rustflags are passed through `CARGO_ENCODED_RUSTFLAGS`, which beats any
//! `RUSTFLAGS` the caller's environment has (CI often sets `-D warnings` or
//! instrumentation flags that must not reach the guest), and environment that an
//! outer `cargo test` sets for its children is removed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{err, Result};

/// Rustflags for the guest: a static, non-PIE executable (see tests/guest/build.rs
/// for the link arguments).
pub const RUSTFLAGS: &[&str] = &[
    "-C",
    "relocation-model=static",
    "-C",
    "target-feature=+crt-static",
];

/// Where [`build`] puts the guest image for a given cargo target directory.
pub fn elf_path(target_dir: &Path) -> PathBuf {
    target_dir.join("guest").join("baton-guest.elf")
}

/// The guest's source folder.
pub fn source_dir() -> PathBuf {
    crate::repo_root().join("tests").join("guest")
}

/// Builds the guest (release profile) and returns the path of the ELF. Cargo's own
/// up-to-date check makes a second call cheap.
pub fn build(target_dir: &Path) -> Result<PathBuf> {
    let src = source_dir();
    let build_dir = target_dir.join("guest").join("build");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&src)
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(src.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&build_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\x1f"));
    for var in [
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_LLVM_COV",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    crate::run(&mut cmd).map_err(|e| err!("building the harness guest: {e}"))?;
    let built = build_dir.join("release").join("baton-guest");
    let out = elf_path(target_dir);
    // Copy through a temporary name so that a concurrent reader never sees half a file.
    let tmp = out.with_extension(format!("elf.tmp{}", std::process::id()));
    std::fs::copy(&built, &tmp)
        .and_then(|_| std::fs::rename(&tmp, &out))
        .map_err(|e| err!("copying {} to {}: {e}", built.display(), out.display()))?;
    Ok(out)
}
