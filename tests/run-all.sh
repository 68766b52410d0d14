#!/usr/bin/env bash
# Set up and run nogap's whole test suite (unit, integration, real servers,
# real systemd in systemd-nspawn containers). Needs root and Debian.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in debootstrap systemd-container curl iproute2 ca-certificates lintian dpkg-dev binutils prometheus; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [[ -x tests/setup-servers.sh ]]; then
    bash tests/setup-servers.sh
fi

export CARGO_TERM_COLOR=never
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
# Benchmarks are built (they must compile) but not run: they are not tests.
cargo build --all-targets --quiet
cargo test -- --test-threads="${NOGAP_TEST_THREADS:-2}"

# Fuzzing smoke run: every target of fuzz/ for 20 s (NOGAP_FUZZ_MINUTES),
# failing on any finding. It needs the nightly toolchain and cargo-fuzz
# (installed from crates.io here, about a minute; the targets build in about
# three). Skipped without nightly, or with NOGAP_FUZZ=0.
if [[ "${NOGAP_FUZZ:-1}" != 0 ]] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
    bash bench/fuzz.sh "${NOGAP_FUZZ_MINUTES:-0.34}"
else
    echo "fuzz: skipped (no nightly toolchain, or NOGAP_FUZZ=0)" >&2
fi
