#!/usr/bin/env bash
# `npm start`: install, build, make a sample sparse image and convert it with a progress
# bar, then time the same copy with one worker to show what parallel workers buy.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install-deps.sh
[ -d node_modules/@blockconv/core ] || npm ci --no-audit --no-fund
NX_DAEMON=false NX_TUI=false npx nx run-many -t build --outputStyle=static >/dev/null

dir=${DEMO_DIR:-/var/tmp/blockconv-demo}
size_mib=${DEMO_SIZE_MIB:-1024}
mkdir -p "$dir"
src=$dir/sample.raw
if [ ! -f "$src" ] || [ "$(stat -c %s "$src")" != $((size_mib * 1048576)) ]; then
  echo "Making a ${size_mib} MiB sample image with about half of it data: $src"
  rm -f "$src"
  truncate -s "${size_mib}M" "$src"
  # Alternate 8 MiB of data with 8 MiB of hole, and sprinkle 64 KiB extents in the holes.
  for ((mib = 0; mib < size_mib; mib += 16)); do
    dd if=/dev/urandom of="$src" bs=1M seek=$mib count=7 conv=notrunc status=none
    for k in 0 2 4 6 8 10 12 14; do
      dd if=/dev/urandom of="$src" bs=64K seek=$(((mib + 8) * 16 + k)) count=1 conv=notrunc status=none
    done
  done
fi

bc="node packages/cli/bin/blockconv.js"
echo
echo "blockconv convert -p (8 workers):"
rm -f "$dir/copy.raw"
start=$(date +%s%N)
$bc convert -p "$src" "$dir/copy.raw"
parallel=$(( ($(date +%s%N) - start) / 1000000 ))
qemu-img compare -q "$src" "$dir/copy.raw" && echo "qemu-img compare: identical"

echo
echo "blockconv convert -m 1 (one request at a time):"
rm -f "$dir/copy1.raw"
start=$(date +%s%N)
$bc convert -m 1 "$src" "$dir/copy1.raw"
single=$(( ($(date +%s%N) - start) / 1000000 ))
rm -f "$dir/copy.raw" "$dir/copy1.raw"
awk -v p="$parallel" -v s="$single" 'BEGIN { printf "\n%-24s %7.2f s\n%-24s %7.2f s  (%.2fx the time)\n", "8 workers (default):", p / 1000, "1 worker:", s / 1000, s / p }'
