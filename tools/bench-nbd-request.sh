#!/usr/bin/env bash
# Client CPU per NBD request: blockconv's NBD client (TypeScript over node:net) against
# libnbd in C, the same loop (QD requests in flight) against the same qemu-nbd on a Unix
# socket exporting a file of random data in /dev/shm. Prints one line per tool and case.
# The decision of issue 17 (TypeScript rather than a libnbd binding) rests on these figures.
#
# Environment: SIZE_MIB=1024 export size, QD=16, RUNS=3 (alternating; the lines show each run).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${SIZE_MIB:-1024}
QD=${QD:-16}
RUNS=${RUNS:-3}
dpkg-query -W -f='${Status}' libnbd-dev 2>/dev/null | grep -q "install ok installed" || {
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends libnbd-dev qemu-utils >/dev/null
}
[ -f "$ROOT/packages/driver-nbd/dist/index.js" ] || { echo "bench-nbd-request: build first (npx nx run @blockconv/driver-nbd:build)" >&2; exit 1; }
work=$(mktemp -d /dev/shm/blockconv-nbd-req.XXXXXX)
trap 'kill $(cat "$work/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
gcc -O2 -o "$work/libnbd-requests" "$ROOT/tools/bench/nbd-request/libnbd-requests.c" -lnbd
head -c $((SIZE_MIB << 20)) /dev/urandom > "$work/disk.raw"
qemu-nbd -t -e 4 -k "$work/sock" -f raw --cache=writeback "$work/disk.raw" & echo $! > "$work/pid"
for _ in $(seq 50); do [ -S "$work/sock" ] && break; sleep 0.1; done
url="nbd+unix:///?socket=$work/sock"
for case in "200000 4096" "20000 262144"; do
  for mode in r w; do
    for _ in $(seq "$RUNS"); do
      # shellcheck disable=SC2086
      "$work/libnbd-requests" "$url" $case "$QD" $mode
      # shellcheck disable=SC2086
      node "$ROOT/tools/bench/nbd-request/driver-requests.mjs" "$url" $case "$QD" $mode
    done
  done
done
