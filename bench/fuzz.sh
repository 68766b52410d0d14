#!/bin/bash
# Run every fuzz target of fuzz/ for MINUTES minutes each (default 1; a
# decimal like 0.5 works), one after the other, and print a table of execs
# and findings per target. Needs the nightly toolchain and cargo-fuzz
# (cargo install cargo-fuzz). Seeds are read from fuzz/seeds/TARGET (in
# git); what the fuzzer learns goes to fuzz/corpus/TARGET (not in git);
# crashes to fuzz/artifacts/TARGET.
#
#   bash bench/fuzz.sh 5            # 5 minutes per target
#   bash bench/fuzz.sh 0.3 control_request notify_datagram
#
# Exit status 1 if any target found something (or failed to run).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
minutes=${1:-1}
shift || true
secs=$(awk -v m="$minutes" 'BEGIN { s = int(m * 60); print (s < 1 ? 1 : s) }')
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -O >/dev/null 2>&1
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    start=$(date +%s)
    status=0
    cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 \
        >"$logs/$t" 2>&1 || status=$?
    took=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t" | grep -o '[0-9]*$' | tail -1)
    after=$(find "artifacts/$t" -type f | wc -l)
    echo "$t ${execs:-0} $took $(( after - before )) $status" >>"$logs/table"
    if [ "$status" -ne 0 ]; then
        tail -30 "$logs/$t" >&2
    fi
done
printf '%-18s %14s %8s %9s %6s\n' target execs seconds findings exit
while read -r t e s f x; do
    printf '%-18s %14s %8s %9s %6s\n' "$t" "$e" "$s" "$f" "$x"
done <"$logs/table"
# Any finding, or a target that failed, fails the run.
! awk '$4 > 0 || $5 != 0 { bad = 1 } END { exit !bad }' "$logs/table"
