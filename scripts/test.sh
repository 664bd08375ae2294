#!/usr/bin/env bash
# The test command of the README: sets up what the tests need on a fresh Debian machine
# (root), then runs the formatting and lint gates and every test of the workspace,
# including the KVM harness. Set BATON_CI=1 to make a missing resource (/dev/kvm,
# /dev/net/tun, qemu-storage-daemon) fail the harness instead of skipping it.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v qemu-storage-daemon >/dev/null || need_pkgs+=(qemu-utils)
command -v objcopy >/dev/null || need_pkgs+=(binutils)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "== installing ${need_pkgs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
fi

if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
    echo "== installing qemu.qmp (PyPI) for the QMP compatibility tests"
    python3 -m pip install --quiet qemu.qmp==0.0.6
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# Before the tests: the QEMU test of the guest's virtio-net driver needs QEMU unpacked.
echo "== the same guest image on QEMU 7.2 microvm (unpacked from Debian's packages, not installed)"
cargo xtask qemu --passes 300
echo "== cargo test"
cargo test --workspace --locked
echo "== all tests passed"
