#!/usr/bin/env python3
"""Tables for tools/bench-headline.sh (issue 7).

  headline_report.py table WORK SCENARIO   plain-text table of one scenario (stderr)
  headline_report.py final WORK PREFIX     Markdown of everything on stdout and in PREFIX.md,
                                           JSON in PREFIX.json, the sweep in PREFIX-sweep.tsv

WORK is what tools/bench/lib.sh recorded (runs.tsv, verify.tsv, tools.tsv, env.json,
warnings.txt). env.json carries "allocated_bytes" (the template's qcow2 clusters) and
"rate_bytes_per_s" (0 = unshaped): link limit = allocated / rate; fraction = limit / wall.
Exit status of `final`: 0, or 1 if a run failed or a target did not verify.
"""
import csv
import json
import os
import statistics
import sys

from pairs import per_pair

BASE = "qemu-img -m 8 -W"
TCP = "tcp stream"
ORDER = ["nfs-iscsi", "nfs-ram", "ram-iscsi"]
WHAT = {
    "nfs-iscsi": "qcow2 on NFS -> raw on the iSCSI LUN (-n)",
    "nfs-ram": "qcow2 on NFS -> raw in /dev/shm",
    "ram-iscsi": "qcow2 in /dev/shm -> raw on the iSCSI LUN (-n)",
}


def tsv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]


def load(work):
    env = json.load(open(f"{work}/env.json")) if os.path.exists(f"{work}/env.json") else {}
    runs = {}
    for sc, _loc, tool, run, rc, wall, rss, user, sys_, internal, _v, _i, other in tsv(f"{work}/runs.tsv"):
        runs.setdefault(sc, {}).setdefault(tool, []).append({
            "run": int(run), "rc": int(rc), "wall_s": float(wall), "rss_mib": int(rss) // 1024,
            "cpu_s": float(user) + float(sys_), "other_cpu_s": float(other),
            "internal_ms": int(internal) if internal else None})
    verify = {(sc, tool): st for sc, _l, tool, st, _a in tsv(f"{work}/verify.tsv")}
    commands = {(sc, tool): cmd for sc, tool, cmd in tsv(f"{work}/tools.tsv")}
    # CPU of the lab's ganesha + tgtd during each run (servers.tsv; older runs lack it).
    servers = {}
    for sc, tool, _run, cpu in tsv(f"{work}/servers.tsv"):
        servers.setdefault((sc, tool), []).append(float(cpu))
    for sc, tools in runs.items():
        for tool, rs in tools.items():
            for r, cpu in zip(rs, servers.get((sc, tool), [])):
                r["servers_cpu_s"] = cpu
    return env, runs, verify, commands


def summarize(env, runs, verify, commands, sc):
    alloc, rate = env.get("allocated_bytes", 0), env.get("rate_bytes_per_s", 0)
    limit = alloc / rate if rate else None
    rows = []
    for tool, rs in runs.get(sc, {}).items():
        ok = [r for r in rs if r["rc"] == 0]
        wall = statistics.median(r["wall_s"] for r in ok) if ok else None
        rows.append({
            "tool": tool, "command": commands.get((sc, tool), ""),
            "runs": len(rs), "failed": len(rs) - len(ok),
            "walls_s": [r["wall_s"] for r in rs],
            "median_wall_s": wall,
            # blockconv's own copy time (open to flushed, without process start and exit).
            "median_copy_s": statistics.median(r["internal_ms"] / 1000 for r in ok)
            if ok and all(r["internal_ms"] for r in ok) else None,
            "mb_per_s": alloc / wall / 1e6 if wall else None,
            "link_limit_s": limit,
            "fraction_of_limit": limit / wall if (limit and wall) else None,
            "cpu_s": statistics.median(r["cpu_s"] for r in ok) if ok else None,
            "other_cpu_s": statistics.median(r["other_cpu_s"] for r in ok) if ok else None,
            "servers_cpu_s": statistics.median(r["servers_cpu_s"] for r in ok)
            if ok and all("servers_cpu_s" in r for r in ok) else None,
            "rss_mib": max(r["rss_mib"] for r in ok) if ok else None,
            "verified": verify.get((sc, tool), "-"),
        })
    # Ratios are medians of per-pair ratios (pairs.py), with their range.
    walls = {r["tool"]: {x["run"]: x["wall_s"] for x in runs[sc][r["tool"]] if x["rc"] == 0} for r in rows}
    # The TCP stream's own transfer time (its "copy s"): without the start of its four
    # helper processes (~0.2 s), which says nothing about the links.
    if TCP in walls:
        walls[TCP] = {x["run"]: x["internal_ms"] / 1000 if x["internal_ms"] else x["wall_s"]
                      for x in runs[sc][TCP] if x["rc"] == 0}
    for r in rows:
        r["vs_qemu"], r["vs_qemu_range"], _ = per_pair(walls[r["tool"]], walls.get(BASE, {}))
        # The TCP stream's time / this tool's: 1.0 = as fast as bare TCP through the links.
        r["of_tcp"], r["of_tcp_range"], _ = per_pair(walls.get(TCP, {}), walls[r["tool"]])
    return rows


def f(v, fmt):
    return "-" if v is None else format(v, fmt)


def fr(v, rng):
    """A per-pair median with its range."""
    return "-" if v is None else f"{v:.2f} ({rng[0]:.2f}-{rng[1]:.2f})"


def table(rows, md):
    head = ["tool", "median wall s", "copy s", "MB/s", "link limit s", "fraction of limit",
            f"/ {BASE} (per-pair median, range)", "of tcp stream (per-pair)", "CPU s", "servers CPU s", "other CPU s", "peak RSS MiB", "runs (wall s)", "verified"]
    out = []
    if md:
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * 11 + ["---", "---"]) + "|")
    else:
        out.append(f"{'tool':<22} {'wall s':>7} {'copy s':>7} {'MB/s':>7} {'limit s':>8} {'of limit':>8} {'/qemu-W':>17} {'of tcp':>17} "
                   f"{'CPU s':>6} {'servers':>7} {'other':>6} {'RSS':>5}  runs")
    for r in rows:
        cells = [r["tool"], f(r["median_wall_s"], ".2f"), f(r["median_copy_s"], ".2f"), f(r["mb_per_s"], ".0f"), f(r["link_limit_s"], ".2f"),
                 f(r["fraction_of_limit"], ".2f"), fr(r["vs_qemu"], r["vs_qemu_range"]), fr(r["of_tcp"], r["of_tcp_range"]), f(r["cpu_s"], ".2f"),
                 f(r["servers_cpu_s"], ".2f"), f(r["other_cpu_s"], ".2f"), f(r["rss_mib"], "d"),
                 " ".join(format(w, ".2f") for w in r["walls_s"]) + (f" ({r['failed']} failed)" if r["failed"] else ""),
                 r["verified"]]
        if md:
            out.append("| " + " | ".join(cells) + " |")
        else:
            out.append(f"{cells[0]:<22} {cells[1]:>7} {cells[2]:>7} {cells[3]:>7} {cells[4]:>8} {cells[5]:>8} {cells[6]:>17} {cells[7]:>17} "
                       f"{cells[8]:>6} {cells[9]:>7} {cells[10]:>6} {cells[11]:>5}  {cells[12]}  {cells[13]}")
    return "\n".join(out)


def sweep_rows(env, runs):
    alloc, rate = env.get("allocated_bytes", 0), env.get("rate_bytes_per_s", 0)
    out = []
    for tool, rs in runs.get("sweep", {}).items():
        ok = [r["wall_s"] for r in rs if r["rc"] == 0]
        if not ok:
            continue
        parts = tool.split()
        family, workers = parts[0], parts[2]  # "blockconv -m 8", "qemu-img -m 8 -W"
        wall = statistics.median(ok)
        out.append({"family": family + (" (-W)" if tool.endswith("-W") else ""), "workers": workers,
                    "wall_s": wall, "mb_per_s": alloc / wall / 1e6,
                    "fraction_of_limit": (alloc / rate) / wall if rate else None})
    return out


def main():
    mode, work = sys.argv[1], sys.argv[2]
    env, runs, verify, commands = load(work)
    if mode == "table":
        sc = sys.argv[3]
        print(f"\n{sc}: {WHAT.get(sc, sc)}; links {env.get('rate')}", file=sys.stderr)
        print(table(summarize(env, runs, verify, commands, sc), md=False), file=sys.stderr)
        return 0
    prefix = sys.argv[3]
    alloc, rate = env.get("allocated_bytes", 0), env.get("rate_bytes_per_s", 0)
    md = [f"Run of {env.get('date')}, blockconv {env.get('blockconv_rev')} (build {env.get('blockconv_build')}), "
          f"{env.get('host')}; node {env.get('node')}, qemu-img {env.get('qemu_img')}, "
          f"ganesha {env.get('ganesha')}, tgt {env.get('tgtd')}, libnfs {env.get('libnfs')}, libiscsi {env.get('libiscsi')}.",
          f"Template: {env.get('size', 0) / 2**30:g} GiB qcow2 (64 KiB clusters), {alloc / 2**30:.3f} GiB allocated; "
          f"links: {env.get('rate')}"
          + (f"; link limit {alloc / rate:.2f} s" if rate else " (unshaped: no link limit)")
          + f"; RUNS={env.get('runs')}.", ""]
    status = 0
    result = {"env": env, "scenarios": {}}
    for sc in ORDER + [s for s in runs if s not in ORDER and s != "sweep"]:
        if sc not in runs:
            continue
        rows = summarize(env, runs, verify, commands, sc)
        result["scenarios"][sc] = rows
        if any(r["failed"] or (r["verified"] != "OK" and r["tool"] != TCP) for r in rows):
            status = 1
        md += [f"**{sc}**: {WHAT.get(sc, sc)}", "", table(rows, md=True), ""]
    # The targets, when the rows exist.
    notes = []
    ni = {r["tool"]: r for r in result["scenarios"].get("nfs-iscsi", [])}
    d, one, q = ni.get("blockconv (default)"), ni.get("blockconv -m 1"), ni.get(BASE)
    if d and d["fraction_of_limit"]:
        notes.append(f"- blockconv default nfs-iscsi at {d['fraction_of_limit']:.2f} of the link limit (target >= 0.93)"
                     + (f"; its copy alone (process start and exit aside) at {d['link_limit_s'] / d['median_copy_s']:.2f}"
                        if d["median_copy_s"] else ""))
    if d and d["fraction_of_limit"]:
        notes.append(f"- issue 16: default nfs-iscsi >= 0.94 of the link limit: {d['fraction_of_limit']:.3f}"
                     + (f"; >= 0.985 of a plain TCP stream: {d['of_tcp']:.3f} ({d['of_tcp_range'][0]:.3f}-{d['of_tcp_range'][1]:.3f})"
                        if d.get("of_tcp") else ""))
    if d and d["vs_qemu"]:
        notes.append(f"- blockconv default / {BASE} wall (per-pair median): {d['vs_qemu']:.2f} (target <= 1.0)")
    if d and one and d["median_wall_s"] and one["median_wall_s"]:
        notes.append(f"- blockconv -m 1 / default wall: {one['median_wall_s'] / d['median_wall_s']:.2f} (target >= 1.7)")
    sw = sweep_rows(env, runs)
    if sw:
        result["sweep"] = sw
        with open(prefix + "-sweep.tsv", "w") as fo:
            fo.write("family\tworkers\twall_s\tmb_per_s\tfraction_of_limit\n")
            for r in sw:
                fo.write(f"{r['family']}\t{r['workers']}\t{r['wall_s']:.3f}\t{r['mb_per_s']:.1f}\t"
                         f"{'' if r['fraction_of_limit'] is None else format(r['fraction_of_limit'], '.3f')}\n")
        md += ["**sweep** (nfs-iscsi, median wall of "
               f"{max(len(v) for v in runs['sweep'].values())} run(s) each):", "",
               "| tool | workers | wall s | MB/s | fraction of limit |", "|---|---:|---:|---:|---:|"]
        md += [f"| {r['family']} | {r['workers']} | {r['wall_s']:.2f} | {r['mb_per_s']:.0f} | "
               f"{f(r['fraction_of_limit'], '.2f')} |" for r in sw]
        md.append("")
        bc = [r for r in sw if r["family"] == "blockconv" and r["workers"] != "auto"]
        auto = next((r for r in sw if r["family"] == "blockconv" and r["workers"] == "auto"), None)
        if bc and auto:
            best = min(bc, key=lambda r: r["wall_s"])
            notes.append(f"- -m auto: {auto['wall_s']:.2f} s against the best fixed count (-m {best['workers']}) "
                         f"{best['wall_s']:.2f} s: {auto['wall_s'] / best['wall_s']:.3f} (target <= 1.05)")
        if any(verify.get(("sweep", t)) not in (None, "OK") for t in runs["sweep"]):
            status = 1
    if notes:
        md += ["Against issue 7's targets:", ""] + notes + [""]
    warns = open(f"{work}/warnings.txt").read().strip() if os.path.exists(f"{work}/warnings.txt") else ""
    if warns:
        md += ["Warnings:", ""] + [f"- {w}" for w in warns.splitlines()] + [""]
    text = "\n".join(md)
    print(text)
    with open(prefix + ".md", "w") as fo:
        fo.write(text + "\n")
    with open(prefix + ".json", "w") as fo:
        json.dump(result, fo, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(main())
