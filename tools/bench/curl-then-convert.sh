#!/usr/bin/env bash
# The two-step way (what users do when qemu-img's curl driver is slow): download with
# curl -o to a scratch file next to the target, then convert it locally with qemu-img.
# Usage: curl-then-convert.sh URL TARGET SOURCE_FORMAT
set -euo pipefail
url=$1 dst=$2 fmt=$3
tmp=$(mktemp "$(dirname "$dst")/download.XXXXXX")
trap 'rm -f "$tmp"' EXIT
curl -sS --fail -o "$tmp" "$url"
qemu-img convert -f "$fmt" -O raw -m 8 -W "$tmp" "$dst"
