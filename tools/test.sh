#!/usr/bin/env bash
# `npm test`: installs everything (system packages, npm ci, native builds), checks the
# tree with Biome, builds and runs every package's tests through nx, then prints one "N passed, N failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install-deps.sh
if [ -z "${BLOCKCONV_NO_INSTALL:-}" ]; then
  npm ci --no-audit --no-fund
fi

# Formatting and lint first (biome.jsonc): a tree that does not pass is not tested.
npx biome ci .

export NX_DAEMON=false NX_NO_CLOUD=true NX_TUI=false
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# --skip-nx-cache: every call tests this tree, never replays results cached from an earlier run.
npx nx run-many -t build test --parallel=1 --outputStyle=stream --skip-nx-cache 2>&1 | tee "$log" || status=$?

# uvu prints Total/Passed/Skipped per file set; add them up for CI. A test file that
# cannot even load prints no totals, so the tasks nx saw fail are counted too.
sed 's/\x1b\[[0-9;]*m//g' "$log" | awk '/ Total: / {t+=$NF} / Passed: / {p+=$NF} / Skipped: / {s+=$NF}
     /^Failed tasks:/ {f=1; next} f && /^- / {tasks++}
     END {printf "%d passed, %d failed, %d skipped; %d failed tasks\n", p, t-p-s, s, tasks}'
exit "$status"
