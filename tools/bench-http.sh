#!/usr/bin/env bash
# HTTP benchmark (issue 17): an image on the lab's HTTP host (nginx, tools/lab.sh) over
# its shaped link, converted to a raw file in /dev/shm by blockconv, by qemu-img (its curl
# driver, qemu-block-extra), and by curl -o then qemu-img convert; side by side, tools
# taking turns. A benchmark, not a test: it fails only when a copy fails or does not verify.
#
# Usage: tools/bench-http.sh [--help]
#
# Scenarios: "qcow2" (the mixed SIZE image of bench-raw.sh as qcow2: ~1 GB of data),
# "raw" (the same image raw: every byte, zeroes too, crosses the link: no block status
# over HTTP).
# Environment: RUNS=5  SIZE=2G  RATE=1gbit (the lab's, brought up if down)  WARMUP=0
#   SCENARIOS="qcow2 raw"  QUIET_WAIT=120  OUT_JSON=bench-out/http.json  TOOLS (see bench-raw.sh)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-5}
WARMUP=${WARMUP:-0}
SIZE=${SIZE:-2G}
RATE=${RATE:-1gbit}
QUIET_WAIT=${QUIET_WAIT:-120}
SCENARIOS=${SCENARIOS:-qcow2 raw}
OUT_JSON=${OUT_JSON:-$ROOT/bench-out/http.json}
BENCH_NAME=bench-http
# shellcheck source=tools/bench/lib.sh
source "$ROOT/tools/bench/lib.sh"
bench_args "$@"

require_tools qemu-img curl node python3 /usr/bin/time
SIZE_BYTES=$(to_bytes "$SIZE")
LAB="bash $ROOT/tools/lab.sh"
$LAB status >/dev/null 2>&1 || $LAB up --rate "$RATE" >&2
[ "$($LAB env | sed -n 's/^LAB_RATE=//p')" = "$RATE" ] || $LAB up --rate "$RATE" >&2
eval "$($LAB env)"

init_work
write_env "\"runs\": $RUNS, \"warmup_rounds\": $WARMUP, \"size\": $SIZE_BYTES, \"rate\": \"$RATE\", \"scenarios\": \"$SCENARIOS\","

shm=$(location_dir shm)
mkdir -p "$shm" "$LAB_HTTP_DIR"
raw_info=$(gen_source "$shm/mixed-$SIZE.raw" --layout mixed --size "$SIZE_BYTES" --seed 1)
for sc in $SCENARIOS; do
  case $sc in
    qcow2)
      info=$(make_qcow2 "$raw_info" "$LAB_HTTP_DIR/mixed-$SIZE.qcow2")
      name=mixed-$SIZE.qcow2 fmt=qcow2 ;;
    raw)
      [ "$LAB_HTTP_DIR/mixed-$SIZE.raw" -nt "$shm/mixed-$SIZE.raw" ] || cp --sparse=always "$shm/mixed-$SIZE.raw" "$LAB_HTTP_DIR/mixed-$SIZE.raw"
      info=$raw_info name=mixed-$SIZE.raw fmt=raw ;;
    *) die "unknown scenario $sc" ;;
  esac
  # Served from the page cache, as a busy image server would: read it once.
  cat "$LAB_HTTP_DIR/$name" >/dev/null
  url=$LAB_HTTP_URL/$name
  tools=${TOOLS:-"qemu-img|qemu-img convert -f $fmt -O raw -m 8 -W {SRC} {DST}
curl -o, then qemu-img|$ROOT/tools/bench/curl-then-convert.sh {SRC} {DST} $fmt
blockconv -m 8 -W -t unsafe|blockconv convert -f $fmt -O raw -m 8 -W -t unsafe {SRC} {DST}
blockconv (default)|blockconv convert -O raw {SRC} {DST}"}
  record_source "$sc" "$shm" "$info"
  run_scenario "$sc" "$shm" "$url" "$shm/http-target.raw" "$RUNS" "$tools" "$LAB_HTTP_DIR/$name" "$fmt"
  python3 "$HELPERS/report.py" table "$WORK" "$sc" "$shm"
done
finish || exit $?
