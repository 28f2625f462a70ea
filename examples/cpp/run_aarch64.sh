#!/usr/bin/env bash
# Run an aarch64 build of the example on this x86 machine under qemu-aarch64 (user-mode emulation with the arm64
# sysroot of scripts/setup_arm.sh). Usage: QEMU_CPU=cortex-a76 examples/cpp/run_aarch64.sh BINARY ARGS...
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root=${TVM_ANYPREC_ARM_ROOT:-$here/../../.arm}
exec qemu-aarch64 -cpu "${QEMU_CPU:-max}" -L "$root/sysroot" "$@"
