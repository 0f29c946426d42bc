#!/usr/bin/env bash
# `npm start`: the scenario blockconv exists for, on this machine. Installs and builds,
# brings up the lab (tools/lab.sh: an NFS server and an iSCSI target in network namespaces,
# links unshaped), puts a generated qcow2 template on the NFS export, deploys it to the
# iSCSI LUN with a progress bar, verifies the LUN with qemu-img compare, then times the
# same deployment with one worker. Cleans up what it made (and takes the lab down if it
# brought it up). If the lab cannot start (not root, no network namespaces, ...), it says
# why and runs the local demo instead: a sparse raw file copied with and without workers.
#
# Environment: DEMO_SIZE_MIB (template size, default 1024), DEMO_RATE (lab link rate,
# default none; e.g. 1gbit to see the seed's network), DEMO_DIR (local files,
# default /var/tmp/blockconv-demo), DEMO_LOCAL=1 (skip the lab).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install-deps.sh
[ -d node_modules/@blockconv/core ] || npm ci --no-audit --no-fund
NX_DAEMON=false NX_TUI=false npx nx run-many -t build --outputStyle=static >/dev/null

dir=${DEMO_DIR:-/var/tmp/blockconv-demo}
size_mib=${DEMO_SIZE_MIB:-1024}
rate=${DEMO_RATE:-none}
bc="node packages/cli/bin/blockconv.js"
mkdir -p "$dir"

# Milliseconds a command takes (its output goes through).
timed() { local t0; t0=$(date +%s%N); "$@"; elapsed=$((($(date +%s%N) - t0) / 1000000)); }
summary() {  # parallel-ms single-ms
  awk -v p="$1" -v s="$2" 'BEGIN { printf "\n%-34s %7.2f s\n%-34s %7.2f s  (%.2fx the time)\n",
    "8 workers (default):", p / 1000, "1 worker (one request at a time):", s / 1000, s / p }'
}

# --- the fallback: a local sparse file ----------------------------------------------------
local_demo() {
  local src=$dir/sample.raw parallel single
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
  echo
  echo "blockconv convert -p (8 workers):"
  rm -f "$dir/copy.raw"
  timed $bc convert -p "$src" "$dir/copy.raw"; parallel=$elapsed
  qemu-img compare -q "$src" "$dir/copy.raw" && echo "qemu-img compare: identical"
  echo
  echo "blockconv convert -m 1 (one request at a time):"
  rm -f "$dir/copy1.raw"
  timed $bc convert -m 1 "$src" "$dir/copy1.raw"; single=$elapsed
  rm -f "$dir/copy.raw" "$dir/copy1.raw"
  summary "$parallel" "$single"
}

if [ "${DEMO_LOCAL:-0}" = 1 ]; then local_demo; exit 0; fi

# --- the lab ----------------------------------------------------------------------------
lab_made=0 template="" raw=""
cleanup() {
  [ -n "$template" ] && rm -f "$template"
  [ -n "$raw" ] && rm -f "$raw" "$raw.json"
  if [ "$lab_made" = 1 ]; then
    bash tools/lab.sh down >/dev/null 2>&1 || echo "demo: tools/lab.sh down failed; run it by hand" >&2
  elif [ -n "${LAB_LUN_FILE:-}" ] && [ -f "$LAB_LUN_FILE" ]; then
    # A lab someone else brought up: leave it as it was found, minus our data.
    fallocate --punch-hole --offset 0 --length "$(stat -c %s "$LAB_LUN_FILE")" "$LAB_LUN_FILE" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo
if bash tools/lab.sh status >/dev/null 2>&1; then
  echo "The lab is already up (tools/lab.sh status): using it as it is, leaving it up."
else
  echo "Starting the lab: an NFS server and an iSCSI target, each in its own network namespace"
  echo "(tools/lab.sh up --rate $rate) ..."
  if ! why=$(bash tools/lab.sh up --rate "$rate" 2>&1 >/dev/null); then
    bash tools/lab.sh down >/dev/null 2>&1 || true
    echo
    echo "The lab could not start, so this is the local demo instead. Why:"
    echo "$why" | tail -5 | sed 's/^/    /'
    echo "(the lab needs root, network namespaces, tc, NFS-Ganesha, rpcbind and tgtd: see tools/lab.sh)"
    trap - EXIT
    local_demo
    exit 0
  fi
  lab_made=1
fi
bash tools/lab.sh status
eval "$(bash tools/lab.sh env)"

size=$((size_mib << 20))
raw=$dir/template-source.raw
template=$LAB_NFS_EXPORT_DIR/demo-template.qcow2
echo
echo "Making a ${size_mib} MiB qcow2 template with about half of it data, on the NFS export ..."
python3 tools/bench/gen_sparse.py --layout mixed --fill random --size "$size" --seed 7 "$raw" >/dev/null
qemu-img convert -f raw -O qcow2 -o cluster_size=64k "$raw" "$template"
rm -f "$raw" "$raw.json"; raw=""
alloc=$(qemu-img check --output=json "$template" | python3 -c 'import json,sys; print(json.load(sys.stdin)["allocated-clusters"] * 65536)')
echo "  $LAB_NFS_URL/demo-template.qcow2: $(numfmt --to=iec "$size") virtual, $(numfmt --to=iec "$alloc") of data"
bash tools/lab.sh lun-size "$size" 2>/dev/null
wipe_lun() { fallocate --punch-hole --offset 0 --length "$(stat -c %s "$LAB_LUN_FILE")" "$LAB_LUN_FILE"; sync -f "$LAB_LUN_FILE"; }

src_url=$LAB_NFS_URL/demo-template.qcow2
echo
echo "Deploying it to the LUN, 8 workers (blockconv's default):"
echo "  blockconv convert -p -n -O raw $src_url $LAB_ISCSI_URL"
wipe_lun
timed $bc convert -p -n -O raw "$src_url" "$LAB_ISCSI_URL"; parallel=$elapsed
echo "Verifying: qemu-img compare -f qcow2 -F raw (the template against what tgtd wrote) ..."
if qemu-img compare -q -f qcow2 -F raw "$template" "$LAB_LUN_FILE"; then
  echo "  identical"
else
  echo "  DIFFERENT: the deployment is wrong"; exit 1
fi

echo
echo "The same deployment with one worker (one request at a time, as a simple copy loop would):"
echo "  blockconv convert -m 1 -n -O raw $src_url $LAB_ISCSI_URL"
wipe_lun
timed $bc convert -m 1 -n -O raw "$src_url" "$LAB_ISCSI_URL"; single=$elapsed
summary "$parallel" "$single"
if [ "$rate" = none ]; then
  echo "(links unshaped: on this machine the CPUs are the limit, the NFS server and the iSCSI target"
  echo " burn much of them; DEMO_RATE=1gbit npm start shapes the links like the seed's network,"
  echo " and tools/bench-headline.sh measures it side by side with qemu-img: docs/PERFORMANCE.md)"
fi
