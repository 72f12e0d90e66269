#!/usr/bin/env bash
# Heap allocation calls (malloc + realloc + calloc) per relayed message, counted exactly
# with uprobes on glibc while the shared harness (../shared/bench/) sends 4 KB messages
# at C=50 through a release build. Unlike CPU time, the count does not move with the
# machine's load: the same binary gives the same figure to within 1 %.
#
#   benches/allocs_per_message.sh [BINARY]     (default: target/release/mailwarden)
#   env: COUNT (messages, default 5000), CORPUS (small or large)
#
# Needs root for the uprobes (perf from Debian's linux-perf) and the harness set up once
# (bash ../shared/bench/setup.sh). Prints the calls per message (start-up and the
# warm-up's first messages included, under 5 % of the total).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$(realpath "${1:-$here/target/release/mailwarden}")
count=${COUNT:-5000}
warmup=200
libc=$(ldd "$bin" | awk '/libc\.so/ {print $3}')
for fn in malloc realloc calloc; do
    perf probe -q -x "$libc" -a "$fn" 2>/dev/null || true
done
# A proxy left over from an earlier run would take part of the traffic.
pkill -f "^$bin run" 2>/dev/null || true
log=$(mktemp)
stat=$(mktemp)
cd "$here"
MAILWARDEN_BIN=$bin CONC=50 CORPUS=${CORPUS:-small} COUNT=$count WARMUP=$warmup \
    SPOOF_CHECK=0 REPEAT=1 ../shared/bench/run.sh mailwarden >"$log" 2>&1 &
harness=$!
until grep -q "warming up" "$log"; do
    kill -0 $harness 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.05
done
pid=$(pgrep -f "^$bin run" | head -1)
# Every thread the proxy has once it is serving (uprobes count per thread).
perf stat -e probe_libc:malloc,probe_libc:realloc,probe_libc:calloc \
    -t "$(ls /proc/"$pid"/task | paste -sd,)" -o "$stat" &
perf=$!
wait $harness
kill -INT $perf 2>/dev/null || true
wait $perf || true
python3 - "$stat" "$((count + warmup))" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
calls = {m[1]: int(m[0].replace(',', '')) for m in re.findall(r'^\s*([\d,]+)\s+probe_libc:(\w+)', text, re.M)}
total = sum(calls.values())
print(f"{total / int(sys.argv[2]):.1f} allocation calls per message ({calls})")
EOF
rm -f "$log" "$stat"
