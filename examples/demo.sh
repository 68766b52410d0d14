#!/usr/bin/env bash
# Build nogap and run it supervising the demo server on 127.0.0.1:8080.
# Reload with `kill -HUP <nogap pid>` or `target/release/nogap reload --wait --control /tmp/nogap-demo.sock`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "demo: cargo is needed (Rust toolchain)" >&2; exit 1; }
echo "demo: building nogap (release)..." >&2
cargo build --release --quiet --bin nogap --bin nogap-demo
ADDR="${NOGAP_DEMO_ADDR:-127.0.0.1:8080}"
CONTROL=/tmp/nogap-demo.sock
cat >&2 <<MSG

demo: nogap is starting 2 workers of nogap-demo on http://$ADDR  (Ctrl-C stops it)
  try:     curl -s http://$ADDR/                 # answers with the worker's pid and generation
  reload:  target/release/nogap reload --wait --control $CONTROL
  status:  target/release/nogap status --control $CONTROL
  load:    while curl -sf http://$ADDR/ >/dev/null; do :; done   # never fails across reloads

MSG
exec target/release/nogap run --listen "http=$ADDR" --workers 2 --ready notify \
    --control "$CONTROL" --drain-timeout 10s -- target/release/nogap-demo
