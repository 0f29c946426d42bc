#!/usr/bin/env bash
# Raw → raw conversion benchmark: blockconv against qemu-img convert and nbdcopy.
# A benchmark, not a test: it prints numbers; it fails only when a tool fails, a
# copy does not verify, or blockconv goes over the RSS budget of the huge scenario.
#
# Usage: tools/bench-raw.sh [--skip-huge | --huge-only] [--help]
#
# Scenario "mixed": a SIZE sparse raw source, ~50% random data in large (MiB) and
# many 64 KiB extents, copied RUNS times per tool at each location, tools taking
# turns (A B C D A B C D ...) so drift (page cache, thermal, other load) hits all alike.
# Scenario "huge": a 1 TiB source with every other 64 KiB block allocated over its
# first 8 GiB (4 GiB of data, 65536 extents), copied HUGE_RUNS times per tool.
#
# Environment:
#   RUNS=5              runs per tool and location (mixed scenario)
#   WARMUP=0            untimed rounds of all tools before the timed ones (the first
#                       touch of fresh memory is slow on this VM; medians absorb one)
#   SIZE=2G             virtual size of the mixed source (K/M/G/T suffixes, binary)
#   LOCATIONS="shm disk"  where to run; shm = /dev/shm/blockconv-bench,
#                       disk = /var/tmp/blockconv-bench, anything else = a directory
#   BENCH_DIR=DIR       shorthand for LOCATIONS=DIR
#   SKIP_HUGE=1         skip the 1 TiB scenario (same as --skip-huge)
#   HUGE_DIR=DIR        where the 1 TiB scenario runs (default: shm if it has room, else disk)
#   HUGE_RUNS=1         runs per tool in the huge scenario
#   RSS_BUDGET_MIB=150  blockconv's peak RSS limit in the huge scenario
#   QUIET_WAIT=120      seconds to wait for the machine to go idle before each run
#   CLEAN=1             also delete the generated sources at the end
#   OUT_JSON=bench-out/raw.json   where the JSON goes (raw per-run data in ${OUT_JSON%.json}-work/)
#   TOOLS, HUGE_TOOLS   replace the tool lists; EXTRA_TOOLS appends to the mixed list.
#                       One tool a line: "label|command" with {SRC} and {DST}, or just a
#                       built-in label. The word "blockconv" runs this checkout's CLI, e.g.
#                       EXTRA_TOOLS='bc uv8|env UV_THREADPOOL_SIZE=8 blockconv convert -m 8 -W -t unsafe {SRC} {DST}'
# blockconv convert always gets --output json added, to record its own elapsed time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

RUNS=${RUNS:-5}
WARMUP=${WARMUP:-0}
SIZE=${SIZE:-2G}
LOCATIONS=${LOCATIONS:-${BENCH_DIR:-shm disk}}
SKIP_HUGE=${SKIP_HUGE:-0}
HUGE_ONLY=0
HUGE_RUNS=${HUGE_RUNS:-1}
RSS_BUDGET_MIB=${RSS_BUDGET_MIB:-150}
QUIET_WAIT=${QUIET_WAIT:-120}
CLEAN=${CLEAN:-0}
OUT_JSON=${OUT_JSON:-$ROOT/bench-out/raw.json}
BENCH_NAME=bench-raw
# shellcheck source=tools/bench/lib.sh
source "$ROOT/tools/bench/lib.sh"

for arg in "$@"; do
  case $arg in
    --skip-huge) SKIP_HUGE=1 ;;
    --huge-only) HUGE_ONLY=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-raw: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

# Built-in tools. qemu-img's default target cache is "unsafe" (no flush at the end),
# so "blockconv -t unsafe" is the like-for-like row; "blockconv (default)" writes in
# order and flushes, which is what a user gets without options.
declare -A BUILTIN=(
  [qemu-img]='qemu-img convert -f raw -O raw -m 8 -W {SRC} {DST}'
  [nbdcopy]='nbdcopy {SRC} {DST}'
  [blockconv -m 8 -W -t unsafe]='blockconv convert -m 8 -W -t unsafe {SRC} {DST}'
  [blockconv -m 8 -W]='blockconv convert -m 8 -W {SRC} {DST}'
  [blockconv (default)]='blockconv convert {SRC} {DST}'
  [qemu-img -C]='qemu-img convert -C -f raw -O raw -m 8 -W {SRC} {DST}'
  [blockconv -C -m 8 -W -t unsafe]='blockconv convert -C -m 8 -W -t unsafe {SRC} {DST}'
)
# -C (copy offload): the kernel copies file to file (copy_file_range); both tools have it.
DEFAULT_TOOLS=$'qemu-img\nnbdcopy\nblockconv -m 8 -W -t unsafe\nblockconv (default)\nqemu-img -C\nblockconv -C -m 8 -W -t unsafe'
# nbdcopy is not asked for in the huge scenario but costs a few seconds and is the
# fastest peer; "-m 8 -W" without -t unsafe shows what the final flush costs.
DEFAULT_HUGE_TOOLS=$'qemu-img\nnbdcopy\nblockconv -m 8 -W -t unsafe\nblockconv -m 8 -W\nblockconv (default)'
TOOLS=${TOOLS:-$DEFAULT_TOOLS}${EXTRA_TOOLS:+$'\n'$EXTRA_TOOLS}
HUGE_TOOLS=${HUGE_TOOLS:-$DEFAULT_HUGE_TOOLS}

require_tools qemu-img nbdcopy node python3 /usr/bin/time
SIZE_BYTES=$(to_bytes "$SIZE")

init_work
write_env "\"runs\": $RUNS, \"warmup_rounds\": $WARMUP, \"huge_runs\": $HUGE_RUNS, \"size\": $SIZE_BYTES,
  \"locations\": \"$LOCATIONS\", \"args\": \"$*\",
  \"rss_budget_mib\": $RSS_BUDGET_MIB,"

# nbdcopy picks its own parallelism; record what it chose for local files.
nbdcopy_settings() {
  local dir=$1 s d
  s=$dir/nbdcopy-probe.src d=$dir/nbdcopy-probe.dst
  truncate -s 1M "$s"; rm -f "$d"
  nbdcopy -v "$s" "$d" 2>&1 | grep -Eo 'connections=[0-9]+ requests=[0-9]+ threads=[0-9]+ synchronous=[a-z]+' | head -n1
  rm -f "$s" "$d"
}

SCENARIO_MIXED="mixed-$SIZE"
log "blockconv build $FP_START; runs=$RUNS size=$SIZE locations: $LOCATIONS"
log "nbdcopy on local files: $(nbdcopy_settings /tmp) (its defaults; no --flush, so no fsync either)"

if [ "$HUGE_ONLY" != 1 ]; then
  for l in $LOCATIONS; do
    dir=$(location_dir "$l")
    mkdir -p "$dir"
    src=$dir/mixed-$SIZE.raw
    # Room for a ~50% source (if not made yet) and one target: every tool keeps the
    # holes, so ~50% too, with a margin (a full-size target check refused 16G in RAM).
    need=$((SIZE_BYTES * 6 / 10 + 512 * 1024 * 1024))
    [ -e "$src" ] || need=$((need + SIZE_BYTES / 2 + 512 * 1024 * 1024))
    [ "$(avail_bytes "$dir")" -gt "$need" ] || die "$dir: not enough free space (need ~$((need >> 30)) GiB)"
    make_source "$SCENARIO_MIXED" "$dir" "$src" --layout mixed --size "$SIZE_BYTES" --seed 1
    run_scenario "$SCENARIO_MIXED" "$dir" "$src" "$dir/target.raw" "$RUNS" "$TOOLS"
    python3 "$HELPERS/report.py" table "$WORK" "$SCENARIO_MIXED" "$dir"
    if [ "$CLEAN" = 1 ]; then rm -f "$src" "$src.json"; rmdir "$dir" 2>/dev/null || true; fi
  done
fi

if [ "$SKIP_HUGE" != 1 ]; then
  # 1 TiB virtual, 4 GiB data: needs 4 GiB for the source and 4 GiB per target.
  shm=$(location_dir shm); mkdir -p "$shm"
  if [ -z "${HUGE_DIR:-}" ]; then
    HUGE_DIR=$shm
    [ -e "$shm/huge-1T.raw" ] || [ "$(avail_bytes "$shm")" -gt $((10 << 30)) ] || HUGE_DIR=$(location_dir disk)
  fi
  mkdir -p "$HUGE_DIR"
  src=$HUGE_DIR/huge-1T.raw
  need=$(((4 << 30) + (1 << 30)))
  [ -e "$src" ] || need=$((need + (4 << 30)))
  [ "$(avail_bytes "$HUGE_DIR")" -gt "$need" ] || die "$HUGE_DIR: not enough free space (need ~$((need >> 30)) GiB)"
  make_source huge-1T "$HUGE_DIR" "$src" --layout alternating --size $((1 << 40)) --span $((8 << 30)) --seed 1
  run_scenario huge-1T "$HUGE_DIR" "$src" "$HUGE_DIR/target.raw" "$HUGE_RUNS" "$HUGE_TOOLS"
  python3 "$HELPERS/report.py" table "$WORK" huge-1T "$HUGE_DIR"
  if [ "$CLEAN" = 1 ]; then rm -f "$src" "$src.json"; rmdir "$HUGE_DIR" 2>/dev/null || true; fi
fi

finish "in the huge scenario" || exit $?
