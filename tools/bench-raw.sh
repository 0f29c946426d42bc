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
HELPERS=$ROOT/tools/bench
BC_BIN=$ROOT/packages/cli/bin/blockconv.js

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
WORK=${OUT_JSON%.json}-work

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
)
DEFAULT_TOOLS=$'qemu-img\nnbdcopy\nblockconv -m 8 -W -t unsafe\nblockconv (default)'
# nbdcopy is not asked for in the huge scenario but costs a few seconds and is the
# fastest peer; "-m 8 -W" without -t unsafe shows what the final flush costs.
DEFAULT_HUGE_TOOLS=$'qemu-img\nnbdcopy\nblockconv -m 8 -W -t unsafe\nblockconv -m 8 -W\nblockconv (default)'
TOOLS=${TOOLS:-$DEFAULT_TOOLS}${EXTRA_TOOLS:+$'\n'$EXTRA_TOOLS}
HUGE_TOOLS=${HUGE_TOOLS:-$DEFAULT_HUGE_TOOLS}

log() { echo "bench-raw: $*" >&2; }
die() { log "$*"; exit 2; }
# Warnings also go into the report (WORK is created below, before any warning).
warn() { log "WARNING: $*"; echo "$*" >>"$WORK/warnings.txt"; }

for t in qemu-img nbdcopy node python3 /usr/bin/time; do
  command -v "$t" >/dev/null || die "$t is missing (tools/install-deps.sh; GNU time is the Debian package 'time')"
done
[ -f "$BC_BIN" ] && [ -f "$ROOT/packages/cli/dist/main.js" ] || die "blockconv is not built: cd $ROOT && npx nx run cli:build"

to_bytes() { numfmt --from=iec "${1%[bB]}"; }
SIZE_BYTES=$(to_bytes "$SIZE")

location_dir() {
  case $1 in
    shm) echo /dev/shm/blockconv-bench ;;
    disk) echo /var/tmp/blockconv-bench ;;
    *) echo "$1" ;;
  esac
}
fstype() { findmnt -n -o FSTYPE --target "$1" 2>/dev/null | tail -n1 || stat -f -c %T "$1"; }
avail_bytes() { df -B1 --output=avail "$1" | tail -n1 | tr -d ' '; }

# Label and tool spec ("label|command" or a built-in label) → "label|command".
resolve_spec() {
  local spec=$1
  if [[ $spec == *"|"* ]]; then echo "$spec"
  elif [[ -n ${BUILTIN[$spec]+x} ]]; then echo "$spec|${BUILTIN[$spec]}"
  else die "unknown tool '$spec' (built-ins: ${!BUILTIN[*]})"
  fi
}

# Fill the array CMD from a template. Templates are split on blanks (paths with
# blanks are not supported); "blockconv" becomes node + this checkout's CLI.
build_cmd() {
  local template=$1 src=$2 dst=$3 prev="" w
  CMD=()
  for w in $template; do
    case $w in
      '{SRC}') CMD+=("$src") ;;
      '{DST}') CMD+=("$dst") ;;
      blockconv) CMD+=(node "$BC_BIN") ;;
      convert) CMD+=(convert); [ "$prev" = blockconv ] && CMD+=(--output json) ;;
      *) CMD+=("$w") ;;
    esac
    prev=$w
  done
}

# Hash of the built blockconv: another engineer may rebuild during a long run.
build_fingerprint() {
  (cd "$ROOT" && find packages/*/dist packages/cli/bin native/*/build native/*/dist \
      -type f \( -name '*.js' -o -name '*.node' \) -print0 2>/dev/null |
    sort -z | xargs -0 sha1sum | sha1sum | cut -c1-12)
}

rm -rf "$WORK"
mkdir -p "$WORK"
: >"$WORK/runs.tsv"; : >"$WORK/verify.tsv"; : >"$WORK/tools.tsv"; : >"$WORK/sources.tsv"
: >"$WORK/warnings.txt"
TARGETS=()
cleanup() {
  local t
  for t in "${TARGETS[@]}"; do rm -f "$t"; done
}
trap cleanup EXIT

FP_START=$(build_fingerprint)
python3 - "$WORK/env.json" <<EOF
import json, sys
json.dump({
  "date": "$(date -u +%FT%TZ)",
  "host": "$(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, Linux $(uname -r)",
  "qemu_img": "$(qemu-img --version | head -n1 | awk '{print $3}')",
  "nbdcopy": "$(nbdcopy --version | head -n1 | awk '{print $2}')",
  "node": "$(node --version)",
  "blockconv_rev": "$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)$(cd "$ROOT" && [ -n "$(git status --porcelain packages native 2>/dev/null)" ] && echo '+dirty')",
  "blockconv_build": "$FP_START",
  "uv_threadpool_size": "${UV_THREADPOOL_SIZE:-$(grep -o "UV_THREADPOOL_SIZE ??= '[0-9]*'" "$BC_BIN" | grep -o '[0-9]*') (bin default)}",
  "runs": $RUNS, "warmup_rounds": $WARMUP, "huge_runs": $HUGE_RUNS, "size": $SIZE_BYTES,
  "locations": "$LOCATIONS", "args": "$*",
  "rss_budget_mib": $RSS_BUDGET_MIB,
}, open(sys.argv[1], "w"), indent=2)
EOF

# CPU time (in clock ticks) the whole machine has spent busy since boot.
HZ=$(getconf CLK_TCK)
cpu_busy() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }

# Other people's work skews a 2-core box: before each run, wait (up to QUIET_WAIT s)
# until less than a fifth of a CPU is busy over half a second.
wait_quiet() {
  local deadline=$((SECONDS + QUIET_WAIT)) b0 b1
  while :; do
    b0=$(cpu_busy); sleep 0.5; b1=$(cpu_busy)
    ((b1 - b0 < HZ / 10)) && return 0
    if ((SECONDS >= deadline)); then
      warn "the machine was still busy ($(((b1 - b0) * 200 / HZ))% of a CPU) after ${QUIET_WAIT}s before $1; ran anyway"
      return 0
    fi
    log "waiting for the machine to go idle ($(((b1 - b0) * 200 / HZ))% of a CPU busy) ..."
    sleep 4
  done
}

# Run one tool once under GNU time and append a line to runs.tsv (unless run <= 0:
# a warm-up). Args: scenario location label template src dst run runs
timed_run() {
  local sc=$1 loc=$2 label=$3 template=$4 src=$5 dst=$6 run=$7 rc=0 wall rss user sys vcs ics internal b0 other
  build_cmd "$template" "$src" "$dst"
  wait_quiet "$label run $run at $loc"
  rm -f "$dst"   # every tool starts from a missing target and creates it; right
                 # before the run, so the run recycles the pages just freed
  b0=$(cpu_busy)
  /usr/bin/time -f '%e %M %U %S %w %c' -o "$WORK/time.out" "${CMD[@]}" >"$WORK/last.log" 2>&1 || rc=$?
  # GNU time writes "Command exited with non-zero status N" above the numbers on failure.
  read -r wall rss user sys vcs ics < <(tail -n1 "$WORK/time.out")
  # CPU the machine spent outside the tool during its run: other processes, or
  # kernel threads working for it (writeback). Large values flag a disturbed run.
  other=$(awk -v b="$(($(cpu_busy) - b0))" -v hz="$HZ" -v u="$user" -v s="$sys" \
    'BEGIN { o = b / hz - u - s; printf "%.2f", o < 0 ? 0 : o }')
  internal=$(grep -o '"elapsedMs":[0-9]*' "$WORK/last.log" | tail -n1 | cut -d: -f2 || true)
  ((run <= 0)) || printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$sc" "$loc" "$label" \
    "$run" "$rc" "$wall" "$rss" "$user" "$sys" "$internal" "$vcs" "$ics" "$other" >>"$WORK/runs.tsv"
  if [ "$rc" -ne 0 ]; then
    log "$label FAILED (exit $rc): ${CMD[*]}"
    sed 's/^/    /' "$WORK/last.log" >&2
  else
    log "$(printf '%-8s %-9s  %-30s %7.2f s  %6d MiB  user %6.2f  sys %6.2f  other %5.2f' "${loc%/*}" \
      "$( ((run > 0)) && echo "run $run/$8" || echo warm-up)" "$label" "$wall" $((rss / 1024)) "$user" "$sys" "$other")"
  fi
  return 0
}

# Check a target against its source (outside the timed region) and record its allocation.
verify() {
  local sc=$1 loc=$2 label=$3 src=$4 dst=$5 status=OK alloc="" blocks bsize
  local rc=0 why
  if [ ! -e "$dst" ]; then
    rc=2; why="no target"
  else
    qemu-img compare -q -f raw -F raw "$src" "$dst" 2>"$WORK/compare.err" || rc=$?
    # qemu-img compare: 1 = contents differ, 2 = error
    why=$([ "$rc" = 1 ] && echo "contents differ" || cat "$WORK/compare.err")
  fi
  if [ "$rc" -ne 0 ]; then
    status=FAIL
    log "VERIFY FAILED: $label at $loc: $why"
  fi
  if [ -e "$dst" ]; then
    read -r blocks bsize < <(stat -c '%b %B' "$dst")
    alloc=$((blocks * bsize))
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$sc" "$loc" "$label" "$status" "$alloc" >>"$WORK/verify.tsv"
}

# Run a scenario: every tool RUNS times, alternating, verifying each tool's first copy.
run_scenario() {
  local sc=$1 loc=$2 src=$3 dst=$4 runs=$5 tools=$6 run spec label template data
  local -a specs=()
  while IFS= read -r spec; do
    [ -n "$spec" ] && specs+=("$(resolve_spec "$spec")")
  done <<<"$tools"
  for spec in "${specs[@]}"; do
    printf '%s\t%s\t%s\n' "$sc" "${spec%%|*}" "${spec#*|}" >>"$WORK/tools.tsv"
  done
  TARGETS+=("$dst")
  # Start each location with no dirty pages (e.g. from the previous location's
  # targets) that the kernel would write back during the first runs.
  sync
  # Every run but the first starts right after the previous target was deleted, so
  # its pages are recycled. The very first run would instead get memory the guest
  # has handed back to the host (this VM's balloon reports free pages after ~2 s),
  # which costs ~2 s/GiB of extra sys time: one tool alone would pay it. A dummy
  # target as big as the data puts the first run on the same footing.
  data=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["data_bytes"])' "$SOURCE_INFO")
  dd if=/dev/zero of="$dst" bs=4M count=$(((data + (4 << 20) - 1) >> 22)) status=none
  for ((run = 1 - WARMUP; run <= runs; run++)); do
    for spec in "${specs[@]}"; do
      label=${spec%%|*} template=${spec#*|}
      timed_run "$sc" "$loc" "$label" "$template" "$src" "$dst" "$run" "$runs"
      if ((run == 1)); then verify "$sc" "$loc" "$label" "$src" "$dst"; fi
    done
  done
  rm -f "$dst"
  local fp
  fp=$(build_fingerprint)
  [ "$fp" = "$FP_START" ] || warn "blockconv's build changed since the start ($FP_START -> $fp): $sc at $loc may mix builds"
}

# Generate (or reuse) a source; record its description for the report.
make_source() {
  local sc=$1 dir=$2 out=$3 info; shift 3
  mkdir -p "$dir"
  log "source $out: generating or reusing ..."
  info=$(python3 "$HELPERS/gen_sparse.py" "$@" "$out")
  log "  $info"
  SOURCE_INFO=$info
  printf '%s\t%s\t%s\t%s\n' "$sc" "$dir" "$(fstype "$dir")" "$info" >>"$WORK/sources.tsv"
}

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
    # Room for a ~50% source (if not made yet) and one target.
    need=$((SIZE_BYTES + 512 * 1024 * 1024))
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

FP_END=$(build_fingerprint)

echo
status=0
python3 "$HELPERS/report.py" final "$WORK" "$OUT_JSON" || status=$?
log "JSON: $OUT_JSON; per-run data: $WORK/"
case $status in
  0) ;;
  1) log "a copy failed or did not verify" ;;
  3) log "blockconv went over the ${RSS_BUDGET_MIB} MiB RSS budget in the huge scenario" ;;
esac
exit "$status"
