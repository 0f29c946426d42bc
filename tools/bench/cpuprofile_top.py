#!/usr/bin/env python3
"""Top self-time items of a V8 .cpuprofile (node --cpu-prof), for docs/PERFORMANCE.md.

  cpuprofile_top.py FILE.cpuprofile [N]

Prints the share of samples per function (self time), with "(idle)", "(program)" and
"(garbage collector)" as V8 names them, then the share per source file.
"""
import collections
import json
import os
import sys


def main():
    path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15
    p = json.load(open(path))
    nodes = {nd["id"]: nd for nd in p["nodes"]}
    counts = collections.Counter(p["samples"])
    deltas = p.get("timeDeltas") or [1] * len(p["samples"])
    # Weight every sample by the time until the next one (what V8 attributes to it).
    weight = collections.Counter()
    for i, s in enumerate(p["samples"]):
        weight[s] += deltas[i + 1] if i + 1 < len(deltas) else 0
    total = sum(weight.values()) or 1
    by_fn, by_file = collections.Counter(), collections.Counter()
    for nid, w in weight.items():
        cf = nodes[nid]["callFrame"]
        name = cf["functionName"] or "(anonymous)"
        url = os.path.basename(cf.get("url", "")) or "-"
        line = cf.get("lineNumber", -1) + 1
        by_fn[f"{name}  {url}:{line}" if url != "-" else name] += w
        by_file[url] += w
    print(f"{path}: {total / 1e6:.2f} s sampled, {len(counts)} distinct nodes")
    print("self time by function:")
    for k, w in by_fn.most_common(n):
        print(f"  {100 * w / total:5.1f} %  {k}")
    print("self time by file:")
    for k, w in by_file.most_common(8):
        print(f"  {100 * w / total:5.1f} %  {k}")


if __name__ == "__main__":
    main()
