#!/usr/bin/env bash
# raw → qcow2 conversion benchmark: blockconv against qemu-img convert (issue 4).
# A benchmark, not a test: it prints numbers; it fails only when a tool fails, a
# target does not verify (qemu-img compare with the source and qemu-img check), or
# blockconv goes over the RSS budget.
#
# Usage: tools/bench-qcow2-write.sh [--help]
#
# Sources are bench-raw.sh's "mixed" raw images (gen_sparse.py --layout mixed --size
# SIZE --seed 1: ~50% data in large and many 64 KiB extents), reused if already there:
#   plain   random data → qcow2 (64 KiB clusters)
#   zlib    random hex digits (they shrink to ~60%) → qcow2 -c, compression_type=zlib
#   zstd    the same with compression_type=zstd (not run by default)
# Each tool converts RUNS times, tools taking turns (A B C A B C ...), every target
# made afresh; each tool's first target is checked with qemu-img compare and check.
# The report lists each target's allocated bytes: -c output sizes compare there.
#
# Environment:
#   RUNS=5              runs per tool and scenario
#   WARMUP=0            untimed rounds of all tools before the timed ones
#   SIZE=2G             virtual size of the sources (K/M/G/T suffixes, binary)
#   SCENARIOS="plain zlib"  which conversions (see above)
#   LOCATIONS="shm disk"  where sources and targets live; shm = /dev/shm/blockconv-bench,
#                       disk = /var/tmp/blockconv-bench, anything else = a directory
#   RSS_BUDGET_MIB=150  blockconv's peak RSS limit (every scenario)
#   QUIET_WAIT=120      seconds to wait for the machine to go idle before each run
#   CLEAN=1             also delete the generated sources at the end
#   OUT_JSON=bench-out/qcow2-write.json   where the JSON goes (raw data in ${OUT_JSON%.json}-work/)
#   TOOLS / EXTRA_TOOLS as in bench-qcow2.sh: "label|command" lines with {SRC} {DST},
#                       or built-in labels; {COPTS} is the scenario's qcow2 options.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

RUNS=${RUNS:-5}
WARMUP=${WARMUP:-0}
SIZE=${SIZE:-2G}
SCENARIOS=${SCENARIOS:-plain zlib}
LOCATIONS=${LOCATIONS:-${BENCH_DIR:-shm disk}}
RSS_BUDGET_MIB=${RSS_BUDGET_MIB:-150}
QUIET_WAIT=${QUIET_WAIT:-120}
CLEAN=${CLEAN:-0}
OUT_JSON=${OUT_JSON:-$ROOT/bench-out/qcow2-write.json}
BENCH_NAME=bench-qcow2-write
# shellcheck source=tools/bench/lib.sh
source "$ROOT/tools/bench/lib.sh"

bench_args "$@"

# Scenario → "fill of the raw source|convert options (both tools)".
declare -A WRITE_SCENARIOS=(
  [plain]='random|-O qcow2 -o cluster_size=64k'
  [zlib]='hex|-c -O qcow2 -o cluster_size=64k,compression_type=zlib'
  [zstd]='hex|-c -O qcow2 -o cluster_size=64k,compression_type=zstd'
)
for s in $SCENARIOS; do
  [[ -n ${WRITE_SCENARIOS[$s]+x} ]] || die "unknown scenario '$s' (known: ${!WRITE_SCENARIOS[*]})"
done

# qemu-img's default target cache mode is "unsafe" (no flush at the end): the
# like-for-like row is blockconv with -t unsafe. "-m 8 -t unsafe" (in order) measures
# the other write mode; "(default)" is what a user gets without options.
declare -A BUILTIN=(
  [qemu-img]='qemu-img convert -m 8 -W {COPTS} {SRC} {DST}'
  [blockconv -m 8 -W -t unsafe]='blockconv convert -m 8 -W -t unsafe {COPTS} {SRC} {DST}'
  [blockconv -m 8 -t unsafe]='blockconv convert -m 8 -t unsafe {COPTS} {SRC} {DST}'
  [blockconv (default)]='blockconv convert {COPTS} {SRC} {DST}'
)
DEFAULT_TOOLS=$'qemu-img\nblockconv -m 8 -W -t unsafe\nblockconv -m 8 -t unsafe'
TOOLS=${TOOLS:-$DEFAULT_TOOLS}${EXTRA_TOOLS:+$'\n'$EXTRA_TOOLS}
RATIO_TOOL='blockconv -m 8 -W -t unsafe'

require_tools qemu-img node python3 /usr/bin/time
SIZE_BYTES=$(to_bytes "$SIZE")

init_work
write_env "\"title\": \"raw → qcow2 benchmark (tools/bench-qcow2-write.sh)\",
  \"baselines\": [\"qemu-img\"], \"rss_budget_scope\": \"\",
  \"ratio_target\": {\"tool\": \"$RATIO_TOOL\", \"max\": 1.0},
  \"runs\": $RUNS, \"warmup_rounds\": $WARMUP, \"size\": $SIZE_BYTES,
  \"scenarios\": \"$SCENARIOS\", \"locations\": \"$LOCATIONS\", \"args\": \"$*\",
  \"rss_budget_mib\": $RSS_BUDGET_MIB,"

MADE=()
log "blockconv build $FP_START; runs=$RUNS size=$SIZE scenarios: $SCENARIOS; locations: $LOCATIONS"

for l in $LOCATIONS; do
  dir=$(location_dir "$l")
  mkdir -p "$dir"
  for s in $SCENARIOS; do
    fill=${WRITE_SCENARIOS[$s]%%|*} copts=${WRITE_SCENARIOS[$s]#*|}
    base=mixed-$SIZE; [ "$fill" = random ] || base=$base-$fill
    src=$dir/$base.raw
    sc=qcow2-write-$s-$base
    need=$((SIZE_BYTES / 2 + 512 * 1024 * 1024))
    [ -e "$src" ] || need=$((need + SIZE_BYTES / 2 + 512 * 1024 * 1024))
    [ "$(avail_bytes "$dir")" -gt "$need" ] || die "$dir: not enough free space (need ~$((need >> 30)) GiB)"
    info=$(gen_source "$src" --layout mixed --size "$SIZE_BYTES" --seed 1 --fill "$fill")
    record_source "$sc" "$dir" "$info"
    tools=${TOOLS//'{COPTS}'/$copts}
    # The built-ins carry {COPTS} in their templates: resolve them here, per scenario.
    resolved=""
    while IFS= read -r spec; do
      [ -n "$spec" ] || continue
      spec=$(resolve_spec "$spec")
      resolved+="${spec//'{COPTS}'/$copts}"$'\n'
    done <<<"$tools"
    run_scenario "$sc" "$dir" "$src" "$dir/target-write.qcow2" "$RUNS" "$resolved" "$src" raw qcow2
    python3 "$HELPERS/report.py" table "$WORK" "$sc" "$dir"
    MADE+=("$src" "$src.json")
  done
  if [ "$CLEAN" = 1 ]; then rm -f "${MADE[@]}"; rmdir "$dir" 2>/dev/null || true; fi
done

finish || exit $?
