#!/usr/bin/env bash
# The qcow2 fuzz campaign of issue 15 (tools/fuzz/qcow2-fuzz.ts): CASES structure-aware
# mutants of valid images made by qemu-img, each through info, map, check, convert and
# checksum (library, and the blockconv command every CLI_EVERY cases) under a time and a
# 256 MiB RSS bound, compared with qemu-img convert. Prints the figures as Markdown; the
# cases worth a look (defects, refusals, leniency) go to $REPORT as JSON lines.
#
#   tools/fuzz-qcow2.sh [CASES (default 100000)] [SEED (default 1)]
#   npx tsx tools/fuzz/qcow2-fuzz.ts --seed S --case I     # replays one case, keeps the mutant
#
# CI runs 300 cases (packages/cli/test/fuzz-qcow2.test.ts). Build first (npm test, or
# npx nx run-many -t build). Exit 1 if any case was a defect.
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-100000}
seed=${2:-1}
report=${REPORT:-/tmp/blockconv-fuzz-qcow2.jsonl}
echo "qcow2 fuzz campaign: $cases cases, seed $seed, $(nproc) CPUs, $(uname -r), $(qemu-img --version | head -1), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ)" >&2
exec npx tsx tools/fuzz/qcow2-fuzz.ts --cases "$cases" --seed "$seed" --cli-every "${CLI_EVERY:-500}" --report "$report"
