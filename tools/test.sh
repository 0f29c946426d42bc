#!/usr/bin/env bash
# `npm test`: installs everything (system packages, npm ci, native builds), builds and
# runs every package's tests through nx, then prints one "N passed, N failed" line.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install-deps.sh
if [ -z "${BLOCKCONV_NO_INSTALL:-}" ]; then
  npm ci --no-audit --no-fund
fi

export NX_DAEMON=false NX_NO_CLOUD=true NX_TUI=false
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# --skip-nx-cache: every call tests this tree, never replays results cached from an earlier run.
npx nx run-many -t build test --parallel=1 --outputStyle=stream --skip-nx-cache 2>&1 | tee "$log" || status=$?

# uvu prints Total/Passed/Skipped per file set; add them up for CI.
awk '/ Total: / {t+=$NF} / Passed: / {p+=$NF} / Skipped: / {s+=$NF}
     END {printf "%d passed, %d failed, %d skipped\n", p, t-p-s, s}' "$log"
exit "$status"
