#!/usr/bin/env python3
"""Generate a sparse raw image for tools/bench-raw.sh and tools/bench-qcow2.sh.

Layouts (all offsets and lengths are multiples of 64 KiB):
  mixed        ~50% data: "large" regions (a 4-48 MiB data extent, then a 1-48 MiB
               hole) alternating at random with "fine" regions (8-64 MiB of
               64 KiB data / 64 KiB hole). The layout comes from a seeded PRNG so
               every location gets the same map; the bytes come from os.urandom.
  alternating  every other 64 KiB block is data over the first --span bytes.

Data (--fill):
  random       random bytes: incompressible, never a zero 4 KiB block in practice
               (qemu-img convert -c stores such clusters uncompressed).
  hex          random hex digits ('0'-'9', 'a'-'f'): 4 bits of entropy a byte, so
               zlib and zstd shrink a 64 KiB cluster to ~60%; never a zero byte.
Holes are real holes (never written), so SEEK_DATA/SEEK_HOLE see them. The file is written
under a temporary name and renamed at the end, so an interrupted run never leaves
a half-made source that would be reused. Prints one JSON line describing the image.
"""
import argparse
import json
import os
import random
import sys
import time

KIB = 1024
MIB = 1024 * KIB
BLOCK = 64 * KIB
CHUNK = 8 * MIB  # largest single os.urandom()/pwrite
LAYOUT_VERSION = 1  # bump when a layout changes, so old sources are regenerated
HEX = bytes.maketrans(bytes(range(256)), bytes(b"0123456789abcdef"[i % 16] for i in range(256)))


def mixed_layout(size, seed):
    """Yield (offset, length) data extents covering about half of size."""
    rng = random.Random(seed)
    pos = 0
    while pos < size:
        if rng.random() < 0.5:
            # large: several MiB to tens of MiB of data, then a hole of similar size
            data = rng.randint(4 * MIB // BLOCK, 48 * MIB // BLOCK) * BLOCK
            hole = rng.randint(1 * MIB // BLOCK, 48 * MIB // BLOCK) * BLOCK
            yield pos, min(data, size - pos)
            pos += data + hole
        else:
            # fine: many 64 KiB extents (data, hole, data, hole, ...)
            span = rng.randint(8 * MIB // BLOCK, 64 * MIB // BLOCK) * BLOCK
            end = min(pos + span, size)
            while pos < end:
                yield pos, min(BLOCK, end - pos)
                pos += 2 * BLOCK
            pos = max(pos, end)


def alternating_layout(size, span):
    for off in range(0, min(span, size), 2 * BLOCK):
        yield off, min(BLOCK, size - off)


def scan_extents(path):
    """Data extents as the file system reports them (SEEK_DATA/SEEK_HOLE)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h - d))
            pos = h
    finally:
        os.close(fd)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=["mixed", "alternating"], required=True)
    ap.add_argument("--size", type=int, required=True, help="virtual size, bytes")
    ap.add_argument("--span", type=int, default=8 << 30, help="alternating: bytes covered")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fill", choices=["random", "hex"], default="random")
    ap.add_argument("--force", action="store_true", help="regenerate even if reusable")
    ap.add_argument("out")
    a = ap.parse_args()
    if a.size % BLOCK:
        sys.exit("gen_sparse: --size must be a multiple of 64 KiB")

    # Reuse: the sidecar OUT.json records the parameters the image was made with.
    params = f"v{LAYOUT_VERSION} layout={a.layout} size={a.size} seed={a.seed}"
    if a.layout == "alternating":
        params += f" span={a.span}"
    if a.fill != "random":  # random keeps the old params: its sources stay reusable
        params += f" fill={a.fill}"
    sidecar = a.out + ".json"
    if not a.force and os.path.exists(a.out) and os.path.exists(sidecar):
        try:
            with open(sidecar) as f:
                old = json.load(f)
            if old.get("params") == params and os.path.getsize(a.out) == a.size:
                old["reused"] = True
                print(json.dumps(old))
                return
        except (OSError, ValueError):
            pass
    for stale in (a.out, sidecar):
        if os.path.exists(stale):
            os.unlink(stale)

    layout = (mixed_layout(a.size, a.seed) if a.layout == "mixed"
              else alternating_layout(a.size, a.span))
    tmp = a.out + ".tmp"
    t0 = time.monotonic()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, a.size)
        # Draw random bytes in big batches (one getrandom call per 8 MiB) and
        # write each extent from a slice of the batch: fast and never repeated.
        pool, used = b"", 0
        for off, length in layout:
            done = 0
            while done < length:
                if used == len(pool):
                    pool, used = os.urandom(CHUNK), 0
                    if a.fill == "hex":
                        pool = pool.translate(HEX)
                n = min(length - done, len(pool) - used)
                os.pwrite(fd, memoryview(pool)[used:used + n], off + done)
                used += n
                done += n
        os.fsync(fd)  # so a disk location starts with no dirty pages of the source
    finally:
        os.close(fd)
    os.rename(tmp, a.out)

    ext = scan_extents(a.out)
    data = sum(n for _, n in ext)
    info = {
        "path": a.out, "layout": a.layout, "size": a.size, "seed": a.seed, "fill": a.fill,
        "data_bytes": data, "data_pct": round(100.0 * data / a.size, 2),
        "extents": len(ext),
        "extents_64k": sum(1 for _, n in ext if n == BLOCK),
        "extents_ge_4m": sum(1 for _, n in ext if n >= 4 * MIB),
        "gen_seconds": round(time.monotonic() - t0, 2),
        "params": params,
    }
    with open(sidecar, "w") as f:
        json.dump(info, f)
    info["reused"] = False
    print(json.dumps(info))


if __name__ == "__main__":
    main()
