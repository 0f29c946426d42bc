#!/bin/sh
# Builds the addon when libdeflate, libzstd and zlib are present; without them, warns
# and succeeds so that the rest of the workspace still installs and tests (the qcow2
# driver then decompresses with node:zlib and WebAssembly libzstd).
#   scripts/native.sh install   (npm install: configure + build)
#   scripts/native.sh build     (nx build: incremental when configured)
if ! pkg-config --exists libdeflate libzstd zlib 2>/dev/null; then
  echo "@blockconv/codec: libdeflate, libzstd or zlib not found (Debian: libdeflate-dev libzstd-dev zlib1g-dev, see tools/install-deps.sh); addon not built, qcow2 uses its slower JavaScript/WebAssembly codecs" >&2
  exit 0
fi
if [ "$1" = build ] && [ -f build/Makefile ]; then exec node-gyp build; fi
exec node-gyp rebuild
