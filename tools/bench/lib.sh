# Shared machinery of the conversion benchmarks (tools/bench-raw.sh, tools/bench-qcow2.sh).
# Sourced, not run. Before sourcing, the script sets:
#   BENCH_NAME   prefix of log lines ("bench-raw")
#   OUT_JSON     where the final JSON goes; WORK=${OUT_JSON%.json}-work holds per-run data
#   QUIET_WAIT   seconds wait_quiet waits for the machine to go idle
#   WARMUP       untimed rounds of all tools before the timed ones
# and, before calling resolve_spec/run_scenario, an associative array BUILTIN of
# "label" -> "command template" (built-in tools).
#
# What the scripts record in WORK (read by tools/bench/report.py):
#   runs.tsv, verify.tsv, tools.tsv, sources.tsv, env.json, warnings.txt

ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
HELPERS=$ROOT/tools/bench
BC_BIN=$ROOT/packages/cli/bin/blockconv.js
WORK=${OUT_JSON%.json}-work

log() { echo "$BENCH_NAME: $*" >&2; }
die() { log "$*"; exit 2; }
# Warnings also go into the report (WORK is created by init_work, before any warning).
warn() { log "WARNING: $*"; echo "$*" >>"$WORK/warnings.txt"; }

# The scripts take no arguments but --help, which prints their header comment.
bench_args() {
  local arg
  for arg in "$@"; do
    case $arg in
      -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
      *) echo "$BENCH_NAME: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
  done
}


# Fail early when a command the benchmark needs, or blockconv's build, is missing.
require_tools() {
  local t
  for t in "$@"; do
    command -v "$t" >/dev/null || die "$t is missing (tools/install-deps.sh; GNU time is the Debian package 'time')"
  done
  [ -f "$BC_BIN" ] && [ -f "$ROOT/packages/cli/dist/main.js" ] || die "blockconv is not built: cd $ROOT && npx nx run cli:build"
}

to_bytes() { numfmt --from=iec "${1%[bB]}"; }

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

# Start with an empty WORK; targets listed in TARGETS are deleted on exit.
init_work() {
  rm -rf "$WORK"
  mkdir -p "$WORK"
  : >"$WORK/runs.tsv"; : >"$WORK/verify.tsv"; : >"$WORK/tools.tsv"; : >"$WORK/sources.tsv"
  : >"$WORK/warnings.txt"
  TARGETS=()
  trap cleanup_targets EXIT
  FP_START=$(build_fingerprint)
}
cleanup_targets() {
  local t
  for t in "${TARGETS[@]}"; do rm -f "$t"; done
}

# Write WORK/env.json: run-wide facts, then the caller's own fields, given as the
# items of a Python dict literal (e.g. '"runs": 5, "size": 2147483648,').
write_env() {
  local extra=$1
  python3 - "$WORK/env.json" <<EOF
import json, sys
json.dump({
  "date": "$(date -u +%FT%TZ)",
  "host": "$(nproc) CPUs, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, Linux $(uname -r)",
  "qemu_img": "$(qemu-img --version | head -n1 | awk '{print $3}')",
  "nbdcopy": "$( (command -v nbdcopy >/dev/null && nbdcopy --version) | head -n1 | awk '{print $2}')",
  "node": "$(node --version)",
  "blockconv_rev": "$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)$(cd "$ROOT" && [ -n "$(git status --porcelain packages native 2>/dev/null)" ] && echo '+dirty')",
  "blockconv_build": "$FP_START",
  # Node reads this CA bundle at every start, before any of blockconv's code (~0.04 s
  # on the standard box): part of start-up cost in such an environment.
  "node_extra_ca_certs": "${NODE_EXTRA_CA_CERTS:-}",
  "uv_threadpool_size": "${UV_THREADPOOL_SIZE:-4 (libuv default)}",
  $extra
}, open(sys.argv[1], "w"), indent=2)
EOF
}

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

is_url() { [[ $1 == *://* ]]; }

# Run one tool once under GNU time and append a line to runs.tsv (unless run <= 0:
# a warm-up). Args: scenario location label template src dst run runs
timed_run() {
  local sc=$1 loc=$2 label=$3 template=$4 src=$5 dst=$6 run=$7 rc=0 wall rss user sys vcs ics internal b0 other
  build_cmd "$template" "$src" "$dst"
  wait_quiet "$label run $run at $loc"
  # Every tool starts from a missing target and creates it; right before the run, so
  # the run recycles the pages just freed. A target that is a URL (an NBD export)
  # cannot be deleted: RESET_TARGET, when set, is run instead to bring it back to its
  # starting state (e.g. all zeroes).
  if is_url "$dst"; then
    [ -z "${RESET_TARGET:-}" ] || eval "$RESET_TARGET"
  else
    rm -f "$dst"
  fi
  # RUN_SAMPLER: a command started beside each timed run and stopped (SIGTERM) after
  # it, with {OUT} replaced by WORK/samples/SCENARIO-LABEL-RUN.tsv (see link_sampler.py).
  local sampler=""
  if [ -n "${RUN_SAMPLER:-}" ] && ((run > 0)); then
    mkdir -p "$WORK/samples"
    local sample_out
    sample_out=$WORK/samples/$(printf '%s-%s-%s' "$sc" "$label" "$run" | tr -c 'A-Za-z0-9._-' '_').tsv
    # Word splitting of the template is intended: it is a command line.
    # shellcheck disable=SC2086
    ${RUN_SAMPLER//\{OUT\}/$sample_out} &
    sampler=$!
  fi
  b0=$(cpu_busy)
  /usr/bin/time -f '%e %M %U %S %w %c' -o "$WORK/time.out" "${CMD[@]}" >"$WORK/last.log" 2>&1 || rc=$?
  if [ -n "$sampler" ]; then
    # By its unique output path: $! may be a wrapper's PID (a pyenv shim runs python as
    # its child), and killing that would leave the sampler running.
    pkill -TERM -f -- "$sample_out" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
  fi
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

# Check a target against a reference image (outside the timed region) and record the
# target's allocation. Args: scenario location label ref dst [ref_format [dst_format]]
# (formats default to raw; the reference is the source, or the raw image a qcow2 source
# was made from).
verify() {
  local sc=$1 loc=$2 label=$3 src=$4 dst=$5 src_fmt=${6:-raw} dst_fmt=${7:-raw} status=OK alloc="" blocks bsize
  local rc=0 why
  if ! is_url "$dst" && [ ! -e "$dst" ]; then
    rc=2; why="no target"
  else
    qemu-img compare -q -f "$src_fmt" -F "$dst_fmt" "$src" "$dst" 2>"$WORK/compare.err" || rc=$?
    # qemu-img compare: 1 = contents differ, 2 = error
    why=$([ "$rc" = 1 ] && echo "contents differ" || cat "$WORK/compare.err")
    if [ "$rc" -eq 0 ] && [ "$dst_fmt" = qcow2 ]; then
      qemu-img check -q "$dst" >"$WORK/compare.err" 2>&1 || { rc=$?; why="qemu-img check: $(head -c 300 "$WORK/compare.err")"; }
    fi
  fi
  if [ "$rc" -ne 0 ]; then
    status=FAIL
    log "VERIFY FAILED: $label at $loc: $why"
  fi
  if ! is_url "$dst" && [ -e "$dst" ]; then
    read -r blocks bsize < <(stat -c '%b %B' "$dst")
    alloc=$((blocks * bsize))
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$sc" "$loc" "$label" "$status" "$alloc" >>"$WORK/verify.tsv"
}

# Run a scenario: every tool RUNS times, alternating, verifying each tool's first copy
# against REF (default: the source itself) read as REF_FORMAT (default raw); targets are
# DST_FORMAT (default raw; a qcow2 target must also pass qemu-img check).
# Args: scenario location src dst runs tools [ref [ref_format [dst_format]]]
# Needs SOURCE_INFO (make_source or record_source) for the source's data size.
run_scenario() {
  local sc=$1 loc=$2 src=$3 dst=$4 runs=$5 tools=$6 ref=${7:-$3} ref_fmt=${8:-raw} dst_fmt=${9:-raw} run spec label template data
  local -a specs=()
  while IFS= read -r spec; do
    [ -n "$spec" ] && specs+=("$(resolve_spec "$spec")")
  done <<<"$tools"
  for spec in "${specs[@]}"; do
    printf '%s\t%s\t%s\n' "$sc" "${spec%%|*}" "${spec#*|}" >>"$WORK/tools.tsv"
  done
  is_url "$dst" || TARGETS+=("$dst")
  # Start each location with no dirty pages (e.g. from the previous location's
  # targets) that the kernel would write back during the first runs.
  sync
  # Every run but the first starts right after the previous target was deleted, so
  # its pages are recycled. The very first run would instead get memory the guest
  # has handed back to the host (this VM's balloon reports free pages after ~2 s),
  # which costs ~2 s/GiB of extra sys time: one tool alone would pay it. A dummy
  # target as big as the data puts the first run on the same footing.
  data=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["data_bytes"])' "$SOURCE_INFO")
  is_url "$dst" || dd if=/dev/zero of="$dst" bs=4M count=$(((data + (4 << 20) - 1) >> 22)) status=none
  for ((run = 1 - WARMUP; run <= runs; run++)); do
    for spec in "${specs[@]}"; do
      label=${spec%%|*} template=${spec#*|}
      timed_run "$sc" "$loc" "$label" "$template" "$src" "$dst" "$run" "$runs"
      if ((run == 1)); then verify "$sc" "$loc" "$label" "$ref" "$dst" "$ref_fmt" "$dst_fmt"; fi
    done
  done
  is_url "$dst" || rm -f "$dst"
  local fp
  fp=$(build_fingerprint)
  [ "$fp" = "$FP_START" ] || warn "blockconv's build changed since the start ($FP_START -> $fp): $sc at $loc may mix builds"
}

# Record a source's description (one JSON object, with at least data_bytes) for the
# report, and make it the SOURCE_INFO of the next run_scenario.
record_source() {
  local sc=$1 dir=$2 info=$3
  SOURCE_INFO=$info
  printf '%s\t%s\t%s\t%s\n' "$sc" "$dir" "$(fstype "$dir")" "$info" >>"$WORK/sources.tsv"
}

# Generate (or reuse) a raw source with gen_sparse.py, print its description (JSON).
gen_source() {
  local out=$1 info; shift
  log "source $out: generating or reusing ..."
  info=$(python3 "$HELPERS/gen_sparse.py" "$@" "$out")
  log "  $info"
  echo "$info"
}

# Generate (or reuse) a source and record it for the report.
# Args: scenario dir out gen_sparse-args...
make_source() {
  local sc=$1 dir=$2 out=$3 info; shift 3
  mkdir -p "$dir"
  info=$(gen_source "$out" "$@")
  record_source "$sc" "$dir" "$info"
}

# Make (or reuse) a qcow2 image of a raw source with qemu-img convert; print the raw
# source's description with an "image" object added. Reused when the image is newer
# than the raw source and its sidecar (IMAGE.json) records the same source and options.
# Args: raw-info-json out options...
make_qcow2() {
  local info=$1 out=$2; shift 2
  local raw made opts=$*
  raw=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["path"])' "$info")
  made="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["params"])' "$info") | $opts | qemu-img $(qemu-img --version | head -n1 | awk '{print $3}')"
  if [ "$out" -nt "$raw" ] && [ -f "$out.json" ] &&
      python3 -c 'import json,sys; sys.exit(json.load(open(sys.argv[1]))["made_from"] != sys.argv[2])' "$out.json" "$made" 2>/dev/null; then
    log "image $out: reused"
  else
    log "image $out: qemu-img convert -f raw -O qcow2 $opts ..."
    rm -f "$out" "$out.json" "$out.tmp"
    local t0=$SECONDS
    # shellcheck disable=SC2086  # options are split on blanks on purpose
    qemu-img convert -f raw -O qcow2 $opts "$raw" "$out.tmp"
    mv "$out.tmp" "$out"
    qemu-img check --output=json "$out" >"$WORK/check.json" || die "qemu-img check $out failed"
    qemu-img info --output=json "$out" >"$WORK/info.json"
    python3 - "$out" "$opts" "$made" "$((SECONDS - t0))" "$WORK/check.json" "$WORK/info.json" >"$out.json" <<'EOF'
import json, os, sys
out, opts, made, secs, check, info = sys.argv[1:]
c, i = json.load(open(check)), json.load(open(info))
print(json.dumps({
    "path": out, "format": "qcow2", "options": f"-O qcow2 {opts}", "made_from": made,
    "file_bytes": os.path.getsize(out), "cluster_size": i["cluster-size"],
    "compression_type": i.get("format-specific", {}).get("data", {}).get("compression-type"),
    "allocated_clusters": c.get("allocated-clusters", 0),
    "allocated_bytes": c.get("allocated-clusters", 0) * i["cluster-size"],
    "compressed_clusters": c.get("compressed-clusters", 0),
    "fragmented_clusters": c.get("fragmented-clusters", 0),
    "make_seconds": int(secs),
}))
EOF
  fi
  log "  $(cat "$out.json")"
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["image"]=json.load(open(sys.argv[2])); print(json.dumps(d))' "$info" "$out.json"
}

# Markdown and JSON of everything recorded; exit status of report.py final
# (0, 1: a copy failed or did not verify, 3: over the RSS budget).
final_report() {
  local status=0
  echo
  python3 "$HELPERS/report.py" final "$WORK" "$OUT_JSON" || status=$?
  log "JSON: $OUT_JSON; per-run data: $WORK/"
  return "$status"
}

# The final report, a line on what failed, and the exit status every bench script ends
# with (0; 1: a copy failed or did not verify; 3: over the RSS budget). Args: [where the
# RSS budget applies, for the message]
finish() {
  local status=0
  final_report || status=$?
  case $status in
    0) ;;
    1) log "a copy failed or did not verify" ;;
    3) log "blockconv went over the ${RSS_BUDGET_MIB:-?} MiB RSS budget${1:+ $1}" ;;
  esac
  return "$status"
}
