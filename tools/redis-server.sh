#!/usr/bin/env bash
# Runs a private Redis on loopback for @blockconv/fleet's tests and benchmarks (BullMQ's
# job store): 127.0.0.1:${REDIS_PORT:-6390}, append-only file in the state dir so that a
# restart keeps the jobs (the fleet tests restart it mid-batch).
#
#   tools/redis-server.sh start|stop|status|restart|url
#
# Environment: REDIS_PORT (default 6390), REDIS_DIR (default /var/tmp/blockconv-redis),
# REDIS_READY_TIMEOUT (seconds, default 10). It installs nothing (tools/install-deps.sh
# does), records the PID it starts and stops exactly that one; a Redis it did not start
# (the system's on 6379, say) is left alone.
set -euo pipefail

port=${REDIS_PORT:-6390}
dir=${REDIS_DIR:-/var/tmp/blockconv-redis}
timeout=${REDIS_READY_TIMEOUT:-10}
pidfile=$dir/redis.pid

log() { echo "redis-server: $*" >&2; }
die() { log "$*"; exit 1; }

command -v redis-server >/dev/null || die "redis-server is missing: run tools/install-deps.sh (as root)"

# The recorded PID counts only while it is still a redis-server (PIDs get reused).
alive() {
  [ -f "$pidfile" ] || return 1
  local pid
  pid=$(cat "$pidfile")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q redis-server
}

ready() { [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; }

start() {
  if alive && ready; then log "already running (pid $(cat "$pidfile")) on redis://127.0.0.1:$port"; return; fi
  ready && die "port $port is taken by a Redis this script did not start"
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --save '' --appendonly yes \
    --dir "$dir" --pidfile "$pidfile" --logfile "$dir/redis.log"
  for _ in $(seq $((timeout * 10))); do ready && break; sleep 0.1; done
  ready || die "did not answer PING within ${timeout}s (see $dir/redis.log)"
  log "serving redis://127.0.0.1:$port (pid $(cat "$pidfile"), data in $dir)"
}

stop() {
  alive || { rm -f "$pidfile"; return 0; }
  local pid
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) if alive && ready; then echo "running: pid $(cat "$pidfile"), redis://127.0.0.1:$port"; else echo "not running"; exit 1; fi ;;
  url) echo "redis://127.0.0.1:$port" ;;
  *) echo "usage: $0 start|stop|status|restart|url" >&2; exit 2 ;;
esac
