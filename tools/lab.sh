#!/usr/bin/env bash
# The headline lab (issue 7): two test hosts in network namespaces, joined to this host by
# veth pairs and shaped like the seed measurement's 1 Gbit/s network.
#
#   tools/lab.sh up [--rate 1gbit|RATE|none]   build what is missing, (re)shape, wait until
#                                             both servers answer; prints the URLs
#   tools/lab.sh down                          tear down exactly what `up` made
#   tools/lab.sh status                        addresses, URLs, shaping, PIDs (exit 3: down)
#   tools/lab.sh env                           the same as shell assignments (for scripts)
#   tools/lab.sh lun-size BYTES                re-create the LUN with exactly BYTES (no session
#                                             may be open; used by tools/bench-headline.sh)
#
#   host                                    netns bclab-nfs
#   bcl-nfs-h 198.18.0.1/30  <== veth ==>   bcl-nfs-n 198.18.0.2/30: rpcbind + NFS-Ganesha
#                                           (VFS export of $LAB_DIR/export as /export),
#                                           with a private /run (../shared/LAB.md)
#                                           netns bclab-iscsi
#   bcl-isc-h 198.18.0.5/30  <== veth ==>   bcl-isc-n 198.18.0.6/30: tgtd, one thin LUN
#                                           (a sparse file in $LAB_LUN_DIR, 2 GiB, 512-byte
#                                           blocks, thin_provisioning=1)
#                                           netns bclab-http
#   bcl-htp-h 198.18.0.9/30  <== veth ==>   bcl-htp-n 198.18.0.10/30: nginx serving
#                                           $LAB_DIR/www on port 80 (Range, keep-alive)
# The LUN lives in RAM (/dev/shm) like an array's NVRAM-backed cache: SYNCHRONIZE CACHE,
# which blockconv sends at the end of a copy, then costs what it costs an array, not
# this VM's disk (measured: fdatasync of 1 GiB on /var/tmp added ~0.8 s to each copy).
# Each veth end gets a tbf qdisc at RATE on its egress, so each link is shaped in both
# directions (netem does not exist here; tbf does). tbf counts whole frames (TCP/IP headers
# too), so about 0.95 of RATE is what a TCP payload can get. Addresses: 198.18.0.0/15 only
# (the benchmarking range). tgtd runs with its own control port ($LAB_TGT_CONTROL, default
# 37) so it never touches the loopback tgtd of tools/iscsi-server.sh (control port 0).
#
# Environment: LAB_DIR (default /var/tmp/blockconv-lab), LAB_LUN_DIR (default
# /dev/shm/blockconv-lab-lun), LAB_LUN_SIZE (default 2G),
# LAB_TGT_CONTROL (default 37), LAB_READY_TIMEOUT (seconds, default 40).
# Every PID it starts is recorded in $LAB_DIR/state and only those are ever stopped.
set -euo pipefail
# shellcheck source=tools/ganesha.sh
source "$(dirname "${BASH_SOURCE[0]}")/ganesha.sh"

PATH=$PATH:/usr/sbin:/sbin
LAB_DIR=${LAB_DIR:-/var/tmp/blockconv-lab}
state=$LAB_DIR/state
export_dir=$LAB_DIR/export
lun_dir=${LAB_LUN_DIR:-/dev/shm/blockconv-lab-lun}
lun_file=$lun_dir/lun1.img
ctl=${LAB_TGT_CONTROL:-37}
timeout=${LAB_READY_TIMEOUT:-40}

NS_NFS=bclab-nfs NS_ISCSI=bclab-iscsi NS_HTTP=bclab-http
NFS_HOST_IF=bcl-nfs-h NFS_NS_IF=bcl-nfs-n NFS_HOST_IP=198.18.0.1 NFS_IP=198.18.0.2
ISCSI_HOST_IF=bcl-isc-h ISCSI_NS_IF=bcl-isc-n ISCSI_HOST_IP=198.18.0.5 ISCSI_IP=198.18.0.6
HTTP_HOST_IF=bcl-htp-h HTTP_NS_IF=bcl-htp-n HTTP_HOST_IP=198.18.0.9 HTTP_IP=198.18.0.10
www_dir=$LAB_DIR/www
IQN=iqn.2026-11.org.blockconv.lab:lun
NFS_URL=nfs://$NFS_IP/export
ISCSI_URL=iscsi://$ISCSI_IP:3260/$IQN/1
HTTP_URL=http://$HTTP_IP

log() { echo "lab: $*" >&2; }
die() { log "$*"; exit 1; }

need_binaries() {
  local missing=() b
  for b in ip tc unshare ganesha.nfsd rpcbind nfs-ls tgtd tgtadm iscsi-inq flock nginx; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]}: run tools/install-deps.sh (as root)"
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, tc)"
}

# A recorded PID counts only while that process still runs the same program.
alive() {
  local pidfile=$state/$1.pid prog=$2 pid cmd
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ -n "$pid" ] || return 1
  # A zombie is dead; an empty cmdline is a process in the middle of exec (ip netns exec
  # becoming the server), alive. Otherwise the PID must still be our program.
  [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" =~ ^[^Z]$ ]] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [ -z "$cmd" ] || grep -q -- "$prog" <<<"$cmd"
}

# Stop a recorded PID: SIGTERM, then SIGKILL after 5 s.
stop_pid() {
  local name=$1 prog=$2 pid
  [ -f "$state/$name.pid" ] || return 0
  pid=$(cat "$state/$name.pid")
  if alive "$name" "$prog"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$state/$name.pid"
}

ns_exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }
nfs_ready() { timeout 5 nfs-ls "$NFS_URL" >/dev/null 2>&1; }
iscsi_ready() { timeout 5 iscsi-inq "$ISCSI_URL" >/dev/null 2>&1; }
http_ready() { timeout 5 bash -c "exec 3<>/dev/tcp/$HTTP_IP/80" 2>/dev/null; }
tgt() { tgtadm -C "$ctl" --lld iscsi "$@"; }

# --- network -------------------------------------------------------------------------

# make_link NS HOST_IF NS_IF HOST_IP NS_IP: a namespace and a /30 veth link to it.
make_link() {
  local ns=$1 hif=$2 nif=$3 hip=$4 nip=$5
  if ! ns_exists "$ns"; then
    ip netns add "$ns"
    touch "$state/netns-$ns"   # made by us: down deletes it
  elif [ ! -f "$state/netns-$ns" ]; then
    die "network namespace $ns exists but was not made by this script; remove it or pick another"
  fi
  ip netns exec "$ns" ip link set lo up
  if ! ip link show "$hif" >/dev/null 2>&1; then
    ip link add "$hif" type veth peer name "$nif" netns "$ns"
  fi
  ip addr replace "$hip/30" dev "$hif"
  ip link set "$hif" up
  ip netns exec "$ns" ip addr replace "$nip/30" dev "$nif"
  ip netns exec "$ns" ip link set "$nif" up
}

# shape IF [NS] RATE: tbf on the egress of one veth end (none: no qdisc).
shape() {
  local dev=$1 ns=$2 rate=$3 run=()
  [ -n "$ns" ] && run=(ip netns exec "$ns")
  if [ "$rate" = none ]; then
    "${run[@]}" tc qdisc del dev "$dev" root 2>/dev/null || true
  else
    # burst: 1 ms at 1 Gbit/s and never below a 64 KiB GSO frame; latency bounds the queue.
    "${run[@]}" tc qdisc replace dev "$dev" root tbf rate "$rate" burst 256kb latency 20ms
  fi
}

shape_all() {
  local rate=$1
  shape "$NFS_HOST_IF" "" "$rate"; shape "$NFS_NS_IF" "$NS_NFS" "$rate"
  shape "$ISCSI_HOST_IF" "" "$rate"; shape "$ISCSI_NS_IF" "$NS_ISCSI" "$rate"
  shape "$HTTP_HOST_IF" "" "$rate"; shape "$HTTP_NS_IF" "$NS_HTTP" "$rate"
  echo "$rate" >"$state/rate"
}

# --- NFS host: rpcbind + ganesha in a private /run --------------------------------------

write_ganesha_conf() {
  ganesha_config "$NFS_IP" "$export_dir" "$state" tools/lab.sh >"$state/ganesha.conf"
}

start_nfs() {
  if alive ganesha ganesha.nfsd && nfs_ready; then return 0; fi
  stop_nfs
  mkdir -p "$export_dir" "$state/recovery"
  write_ganesha_conf
  : >"$state/ganesha.log"; : >"$state/rpcbind.log"
  # ip netns exec and unshare exec in place, so $! is the PID of the sh that starts the
  # two daemons (foreground -f/-F, their own PIDs recorded) and waits for them.
  # shellcheck disable=SC2016
  ip netns exec "$NS_NFS" unshare --mount sh -c '
    state=$1
    mount -t tmpfs tmpfs /run && mkdir -p /run/rpcbind || exit 1
    rpcbind -w -f >>"$state/rpcbind.log" 2>&1 &
    echo $! >"$state/rpcbind.pid"
    i=0; while [ ! -S /run/rpcbind.sock ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    ganesha.nfsd -F -L "$state/ganesha.log" -f "$state/ganesha.conf" -p "$state/ganesha.pidfile" -N NIV_EVENT \
      >>"$state/ganesha.log" 2>&1 &
    echo $! >"$state/ganesha.pid"
    wait' sh "$state" >"$state/nfs-host.log" 2>&1 9>&- &
  echo $! >"$state/nfs-host.pid"
  local deadline=$((SECONDS + timeout))
  until nfs_ready; do
    if [ -f "$state/ganesha.pid" ] && ! alive ganesha ganesha.nfsd; then
      grep -v -i dbus "$state/ganesha.log" | tail -15 >&2 || true
      stop_nfs; die "ganesha exited during start-up (log above: $state/ganesha.log)"
    fi
    if ((SECONDS >= deadline)); then
      grep -v -i dbus "$state/ganesha.log" | tail -15 >&2 || true
      stop_nfs; die "ganesha did not answer $NFS_URL within ${timeout}s"
    fi
    sleep 0.5
  done
}

stop_nfs() {
  stop_pid ganesha ganesha.nfsd
  stop_pid rpcbind rpcbind
  stop_pid nfs-host 'sh -c'
}

# --- iSCSI host: tgtd -------------------------------------------------------------------

# new_lun BYTES: LUN 1 of target 1 on a sparse file of exactly BYTES, thin.
new_lun() {
  local size=$1
  mkdir -p "$lun_dir"
  [ -f "$lun_file" ] || : >"$lun_file"
  [ "$(stat -c %s "$lun_file")" = "$size" ] || truncate -s "$size" "$lun_file"
  tgt --op new --mode logicalunit --tid 1 --lun 1 -b "$lun_file" --blocksize 512
  tgt --op update --mode logicalunit --tid 1 --lun 1 --params thin_provisioning=1
}

start_iscsi() {
  if alive tgtd tgtd && iscsi_ready; then return 0; fi
  stop_iscsi
  [ ! -S "/var/run/tgtd/socket.$ctl" ] || ! tgtadm -C "$ctl" --op show --mode sys >/dev/null 2>&1 ||
    die "a tgtd not started by this script uses control port $ctl (LAB_TGT_CONTROL)"
  : >"$state/tgtd.log"
  ip netns exec "$NS_ISCSI" tgtd -f --iscsi "portal=$ISCSI_IP:3260" --control-port "$ctl" \
    >>"$state/tgtd.log" 2>&1 9>&- &
  echo $! >"$state/tgtd.pid"
  local deadline=$((SECONDS + timeout))
  until tgtadm -C "$ctl" --op show --mode sys >/dev/null 2>&1; do
    alive tgtd tgtd || die "tgtd exited during start-up: $(grep -v -e RDMA -e oom "$state/tgtd.log" | tail -5)"
    ((SECONDS < deadline)) || { stop_iscsi; die "tgtd did not start within ${timeout}s"; }
    sleep 0.1
  done
  {
    tgt --op new --mode target --tid 1 -T "$IQN"
    new_lun "$(numfmt --from=iec "${LAB_LUN_SIZE:-2G}")"
    tgt --op bind --mode target --tid 1 -I ALL
  } >>"$state/tgtd.log" 2>&1 || { stop_iscsi; die "target setup failed: $(tail -5 "$state/tgtd.log")"; }
  until iscsi_ready; do
    ((SECONDS < deadline)) || { stop_iscsi; die "tgtd did not answer $ISCSI_URL within ${timeout}s"; }
    sleep 0.2
  done
}

# tgtd ignores SIGTERM: offline + delete through its own control port, then SIGKILL.
stop_iscsi() {
  [ -f "$state/tgtd.pid" ] || return 0
  if alive tgtd tgtd; then
    tgtadm -C "$ctl" --op update --mode sys --name State -v offline >/dev/null 2>&1 || true
    tgtadm -C "$ctl" --lld iscsi --mode system --op delete >/dev/null 2>&1 || true
  fi
  stop_pid tgtd tgtd
  # tgtd leaves its control socket behind when killed; ours only (control port $ctl).
  rm -f "/var/run/tgtd/socket.$ctl" "/var/run/tgtd/socket.$ctl.lock"
}

lun_size() {
  local size=$1
  alive tgtd tgtd || die "the lab is not up"
  if [ "$(stat -c %s "$lun_file")" = "$size" ]; then return 0; fi
  tgt --op delete --mode logicalunit --tid 1 --lun 1 >>"$state/tgtd.log" 2>&1 ||
    die "could not delete LUN 1 (a session still open?): $(tail -2 "$state/tgtd.log")"
  truncate -s "$size" "$lun_file"
  new_lun "$size" >>"$state/tgtd.log" 2>&1 || die "could not re-create LUN 1: $(tail -2 "$state/tgtd.log")"
  log "LUN 1 is now $size bytes"
}

# --- HTTP host: nginx -----------------------------------------------------------------

start_http() {
  if alive nginx nginx && http_ready; then return 0; fi
  stop_http
  mkdir -p "$www_dir" "$state/nginx-tmp"
  # One worker, no daemon: its PID is the one recorded. sendfile from the page cache;
  # Range and keep-alive as any web server of images has them.
  cat >"$state/nginx.conf" <<CONF
daemon off; master_process off; worker_processes 1;
error_log $state/nginx.log; pid $state/nginx.pidfile;
events { worker_connections 512; }
http {
  access_log off; sendfile on; tcp_nopush on; keepalive_requests 1000000;
  client_body_temp_path $state/nginx-tmp; proxy_temp_path $state/nginx-tmp;
  fastcgi_temp_path $state/nginx-tmp; uwsgi_temp_path $state/nginx-tmp; scgi_temp_path $state/nginx-tmp;
  types { } default_type application/octet-stream;
  server { listen $HTTP_IP:80; root $www_dir; location / { } }
}
CONF
  : >"$state/nginx.log"
  ip netns exec "$NS_HTTP" nginx -c "$state/nginx.conf" -p "$state" >>"$state/nginx.log" 2>&1 9>&- &
  echo $! >"$state/nginx.pid"
  local deadline=$((SECONDS + timeout))
  until http_ready; do
    alive nginx nginx || die "nginx exited during start-up: $(tail -5 "$state/nginx.log")"
    ((SECONDS < deadline)) || { stop_http; die "nginx did not answer $HTTP_URL within ${timeout}s"; }
    sleep 0.1
  done
}

stop_http() { stop_pid nginx nginx; }

# --- commands ---------------------------------------------------------------------------

up() {
  local rate=$1
  need_binaries
  mkdir -p "$state" "$export_dir" "$lun_dir"
  make_link "$NS_NFS" "$NFS_HOST_IF" "$NFS_NS_IF" "$NFS_HOST_IP" "$NFS_IP"
  make_link "$NS_ISCSI" "$ISCSI_HOST_IF" "$ISCSI_NS_IF" "$ISCSI_HOST_IP" "$ISCSI_IP"
  make_link "$NS_HTTP" "$HTTP_HOST_IF" "$HTTP_NS_IF" "$HTTP_HOST_IP" "$HTTP_IP"
  shape_all "$rate"
  start_nfs
  start_iscsi
  start_http
  status_text
}

down() {
  stop_nfs
  stop_iscsi
  stop_http
  local ns
  for ns in "$NS_NFS" "$NS_ISCSI" "$NS_HTTP"; do
    # Deleting the namespace deletes its veth end, and so the pair.
    if [ -f "$state/netns-$ns" ]; then
      ns_exists "$ns" && ip netns del "$ns"
      rm -f "$state/netns-$ns"
    fi
  done
  rm -f "$state/rate"
  # The LUN holds RAM; the export (the template, slow to make) is kept.
  rm -f "$lun_file"; rmdir "$lun_dir" 2>/dev/null || true
  log "down (kept $export_dir and $www_dir; rm -rf $LAB_DIR to free them)"
}

is_up() { alive ganesha ganesha.nfsd && alive tgtd tgtd && alive nginx nginx && nfs_ready && iscsi_ready && http_ready; }

status_text() {
  local rate
  rate=$(cat "$state/rate" 2>/dev/null || echo '?')
  cat <<EOF
lab up, links: $([ "$rate" = none ] && echo "unshaped (veth, no qdisc)" || echo "shaped to $rate each direction (tbf)")
  NFS host   netns $NS_NFS   $NFS_IP (host side $NFS_HOST_IP)   rpcbind pid $(cat "$state/rpcbind.pid"), ganesha pid $(cat "$state/ganesha.pid")
             $NFS_URL  ->  $export_dir
  iSCSI host netns $NS_ISCSI $ISCSI_IP (host side $ISCSI_HOST_IP)   tgtd pid $(cat "$state/tgtd.pid") (tgtadm -C $ctl)
             $ISCSI_URL  ->  $lun_file ($(stat -c %s "$lun_file") bytes, thin)
  HTTP host  netns $NS_HTTP  $HTTP_IP (host side $HTTP_HOST_IP)   nginx pid $(cat "$state/nginx.pid")
             $HTTP_URL/  ->  $www_dir
EOF
}

env_text() {
  cat <<EOF
LAB_NFS_URL=$NFS_URL
LAB_NFS_EXPORT_DIR=$export_dir
LAB_ISCSI_URL=$ISCSI_URL
LAB_HTTP_URL=$HTTP_URL
LAB_HTTP_DIR=$www_dir
LAB_HTTP_IF=$HTTP_HOST_IF
LAB_LUN_FILE=$lun_file
LAB_RATE=$(cat "$state/rate" 2>/dev/null || echo none)
LAB_NFS_IF=$NFS_HOST_IF
LAB_ISCSI_IF=$ISCSI_HOST_IF
LAB_GANESHA_PID=$(cat "$state/ganesha.pid")
LAB_TGTD_PID=$(cat "$state/tgtd.pid")
EOF
}

cmd=${1:-}; shift || true
rate=1gbit
while (($#)); do
  case $1 in
    --rate) rate=${2:?--rate needs a value}; shift 2 ;;
    --rate=*) rate=${1#--rate=}; shift ;;
    *) [ "$cmd" = lun-size ] && [ -z "${lun_bytes:-}" ] && { lun_bytes=$1; shift; continue; }
       echo "lab: unknown argument $1" >&2; exit 2 ;;
  esac
done

mkdir -p "$state"
exec 9>"$state/lock"
flock 9

case $cmd in
  up) up "$rate" ;;
  down) down ;;
  status) if is_up; then status_text; else echo "lab down"; exit 3; fi ;;
  env) is_up || die "the lab is not up (tools/lab.sh up)"; env_text ;;
  lun-size) lun_size "$(numfmt --from=iec "${lun_bytes:?lun-size needs BYTES}")" ;;
  -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) echo "usage: $0 up [--rate 1gbit|none] | down | status | env | lun-size BYTES" >&2; exit 2 ;;
esac
