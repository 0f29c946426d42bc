#!/usr/bin/env python3
"""Tables and JSON for tools/bench-raw.sh and tools/bench-qcow2.sh.

  report.py table WORK SCENARIO LOCATION   plain-text table of one (scenario, location)
  report.py final WORK OUT_JSON            Markdown of everything on stdout + JSON file

WORK holds what the script recorded (tools/bench/lib.sh):
  runs.tsv     scenario location tool run rc wall_s maxrss_kib user_s sys_s internal_ms
               voluntary_ctxsw involuntary_ctxsw other_cpu_s (machine CPU outside the tool)
  verify.tsv   scenario location tool status alloc_bytes
  tools.tsv    scenario tool command
  sources.tsv  scenario location fstype gen-json (gen_sparse.py's description of the raw
               source; for a qcow2 source also "image": its file, options, cluster counts)
  env.json     run-wide facts (versions, host, parameters); optional keys that shape the
               report: "title", "baselines" (tools a column "x TOOL" divides by; default
               qemu-img and nbdcopy; each ratio is the median over the rounds of this tool's
               wall / the baseline's in the same round, with the range), "rss_budget_scope" (prefix of the scenarios the RSS
               budget applies to; default "huge"), "ratio_target" ({"tool", "max"}: a line
               saying whether that tool's median wall / the first baseline's stays <= max)
  warnings.txt one warning a line (build changed mid-run, machine never went idle)

Exit status of `final`: 0, or 1 if a verification failed, or 3 if a blockconv run
of a scenario in the budget's scope went over the RSS budget (env.json "rss_budget_mib").
"""
import csv
import json
import os
import statistics
import sys

from pairs import per_pair

MIB = 1024 * 1024
GIB = 1024 * MIB


def read_tsv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]


def load(work):
    runs = {}
    for sc, loc, tool, run, rc, wall, rss, user, sys_, internal, vcs, ics, other in read_tsv(f"{work}/runs.tsv"):
        runs.setdefault((sc, loc), {}).setdefault(tool, []).append({
            "run": int(run), "rc": int(rc), "wall_s": float(wall),
            "peak_rss_mib": round(int(rss) / 1024, 1),
            "user_s": float(user), "sys_s": float(sys_),
            "cpu_s": round(float(user) + float(sys_), 2),
            "internal_ms": int(internal) if internal else None,
            "voluntary_ctxsw": int(vcs), "involuntary_ctxsw": int(ics),
            "other_cpu_s": float(other),
        })
    verify = {(sc, loc, tool): {"status": st, "alloc_bytes": int(al) if al else None}
              for sc, loc, tool, st, al in read_tsv(f"{work}/verify.tsv")}
    commands = {(sc, tool): cmd for sc, tool, cmd in read_tsv(f"{work}/tools.tsv")}
    sources = {(sc, loc): {"fstype": fs, **json.loads(js)}
               for sc, loc, fs, js in read_tsv(f"{work}/sources.tsv")}
    env = {}
    if os.path.exists(f"{work}/env.json"):
        with open(f"{work}/env.json") as f:
            env = json.load(f)
    return runs, verify, commands, sources, env


DEFAULT_BASELINES = ("qemu-img", "nbdcopy")


def summarize(runs, verify, commands, sc, loc, baselines=DEFAULT_BASELINES):
    """One row per tool, in the order the tools ran."""
    tools = runs.get((sc, loc), {})
    rows = []
    for tool, rs in tools.items():
        ok = [r for r in rs if r["rc"] == 0]
        walls = [r["wall_s"] for r in ok]
        row = {
            "tool": tool, "command": commands.get((sc, tool), ""),
            "runs": len(rs), "failed_runs": len(rs) - len(ok),
            "median_wall_s": statistics.median(walls) if walls else None,
            "min_wall_s": min(walls) if walls else None,
            "median_peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in ok) if ok else None,
            "median_cpu_s": statistics.median(r["cpu_s"] for r in ok) if ok else None,
            "median_user_s": statistics.median(r["user_s"] for r in ok) if ok else None,
            "median_sys_s": statistics.median(r["sys_s"] for r in ok) if ok else None,
            "median_other_cpu_s": statistics.median(r["other_cpu_s"] for r in ok) if ok else None,
            "verify": verify.get((sc, loc, tool), {}).get("status", "-"),
            "target_alloc_mib": None,
            "runs_detail": rs,
        }
        al = verify.get((sc, loc, tool), {}).get("alloc_bytes")
        if al is not None:
            row["target_alloc_mib"] = round(al / MIB, 1)
        internal = [r["internal_ms"] for r in ok if r["internal_ms"] is not None]
        if internal:
            # blockconv's own copy time: wall minus this is start-up and exit
            row["median_internal_s"] = round(statistics.median(internal) / 1000, 2)
        rows.append(row)
    by_tool = {r["tool"]: {x["run"]: x["wall_s"] for x in r["runs_detail"] if x["rc"] == 0} for r in rows}
    for r in rows:
        for name in baselines:
            ratio, spread, n = per_pair(by_tool[r["tool"]], by_tool.get(name, {}))
            r[f"x_{name}"] = round(ratio, 2) if ratio is not None else None
            r[f"x_{name}_spread"] = [round(v, 2) for v in spread] if spread else None
            r[f"x_{name}_pairs"] = n
    return rows


def fmt(v, digits=2):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def fmt_ratio(r, b):
    """Median per-pair ratio with its range: "0.95 (0.90-1.02)"."""
    v, spread = r.get(f"x_{b}"), r.get(f"x_{b}_spread")
    if v is None:
        return "n/a"
    if not spread or r.get(f"x_{b}_pairs", 0) < 2:
        return f"{v:.2f}"
    return f"{v:.2f} ({spread[0]:.2f}-{spread[1]:.2f})"


def head(baselines):
    return (["tool", "runs", "median wall s", "min wall s", "median peak RSS MiB",
             "CPU s (user+sys)", "user s", "sys s", "CPU/wall"]
            + [f"x {b} (per-pair median, range)" for b in baselines] + ["verify", "target alloc MiB", "other CPU s"])


def cells(r, baselines):
    util = (r["median_cpu_s"] / r["median_wall_s"]
            if r["median_cpu_s"] is not None and r["median_wall_s"] else None)
    runs = str(r["runs"]) + (f" ({r['failed_runs']} failed)" if r["failed_runs"] else "")
    return ([r["tool"], runs, fmt(r["median_wall_s"]), fmt(r["min_wall_s"]),
            fmt(r["median_peak_rss_mib"], 1), fmt(r["median_cpu_s"]),
            fmt(r["median_user_s"]), fmt(r["median_sys_s"]), fmt(util)]
            + [fmt_ratio(r, b) for b in baselines]
            + [r["verify"], fmt(r["target_alloc_mib"], 1), fmt(r["median_other_cpu_s"])])


def text_table(rows, baselines=DEFAULT_BASELINES):
    hd = head(baselines)
    data = [hd] + [cells(r, baselines) for r in rows]
    w = [max(len(row[i]) for row in data) for i in range(len(hd))]
    line = lambda row: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i])
                                 for i, c in enumerate(row))
    out = [line(data[0]), "  ".join("-" * x for x in w)]
    out += [line(row) for row in data[1:]]
    return "\n".join(out)


def md_table(rows, baselines=DEFAULT_BASELINES):
    hd = head(baselines)
    out = ["| " + " | ".join(hd) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(hd) - 1)) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r, baselines)) + " |"
            for r in rows]
    return "\n".join(out)


def describe_source(src):
    if not src:
        return ""
    fill = f", {src['fill']} data" if src.get("fill", "random") != "random" else ""
    out = (f"source {src['size'] / GIB:g} GiB ({src['layout']}{fill}), data "
           f"{src['data_bytes'] / GIB:.2f} GiB ({src['data_pct']}%), "
           f"{src['extents']} data extents ({src['extents_64k']} of 64 KiB, "
           f"{src['extents_ge_4m']} of >= 4 MiB)")
    img = src.get("image")
    if img:
        # a qcow2 (or other) image made from that raw source with qemu-img convert
        out += (f"; as {img['format']} `{os.path.basename(img['path'])}` "
                f"(qemu-img convert {img['options']}): file {img['file_bytes'] / MIB:.0f} MiB, "
                f"{img['allocated_clusters']} allocated clusters of {img['cluster_size'] // 1024} KiB, "
                f"{img['compressed_clusters']} compressed, {img['fragmented_clusters']} fragmented")
    return out


def ratio_target_line(rows, env):
    """Whether the target tool's median wall / the first baseline's stays within the target."""
    target = env.get("ratio_target")
    baselines = env.get("baselines", DEFAULT_BASELINES)
    if not target or not baselines:
        return None
    base = baselines[0]
    row = next((r for r in rows if r["tool"] == target["tool"]), None)
    ratio = row and row.get(f"x_{base}")
    if ratio is None:
        return f"target {target['tool']} / {base} <= {target['max']:.2f}: n/a"
    return (f"target {target['tool']} / {base} <= {target['max']:.2f}: "
            f"{'met' if ratio <= target['max'] else 'MISSED'} ({ratio:.2f})")


def cmd_table(work, sc, loc):
    runs, verify, commands, sources, env = load(work)
    baselines = env.get("baselines", DEFAULT_BASELINES)
    rows = summarize(runs, verify, commands, sc, loc, baselines)
    src = sources.get((sc, loc), {})
    print(f"\n== {sc} @ {loc} ({src.get('fstype', '?')}) ==")
    print(describe_source(src))
    print(text_table(rows, baselines))
    line = ratio_target_line(rows, env)
    if line:
        print(line)
    intern = [f"{r['tool']}: {r['median_internal_s']:.2f}s" for r in rows if "median_internal_s" in r]
    if intern:
        print("blockconv's own elapsed (median, excludes node start-up): " + ", ".join(intern))


def cmd_final(work, out_json):
    runs, verify, commands, sources, env = load(work)
    budget = env.get("rss_budget_mib")
    scope = env.get("rss_budget_scope", "huge")
    baselines = env.get("baselines", DEFAULT_BASELINES)
    warnings = []
    if os.path.exists(f"{work}/warnings.txt"):
        with open(f"{work}/warnings.txt") as f:
            warnings = [w.strip() for w in f if w.strip()]
    result = {"env": env, "warnings": warnings, "scenarios": []}
    md = ["## " + env.get("title", "Raw → raw benchmark (tools/bench-raw.sh)"), ""]
    if env:
        peers = f"qemu-img {env.get('qemu_img', '?')}, " + (
            f"nbdcopy {env.get('nbdcopy', '?')}, " if "nbdcopy" in baselines else "")
        md.append(f"{env.get('date', '')}; {env.get('host', '')}; {peers}"
                  f"node {env.get('node', '?')}, blockconv {env.get('blockconv_rev', '?')}. "
                  f"Runs alternate between tools; the target is deleted before each run; "
                  f"no cache is dropped. \"other CPU s\": CPU the machine spent outside the "
                  f"tool during its run (other processes, writeback threads).")
        md.append("")
    status = 0
    for (sc, loc) in runs:
        rows = summarize(runs, verify, commands, sc, loc, baselines)
        src = sources.get((sc, loc), {})
        in_scope = bool(budget) and sc.startswith(scope)
        over = []
        if in_scope:
            over = [r["tool"] for r in rows if r["tool"].startswith("blockconv")
                    and r["median_peak_rss_mib"] is not None
                    and max(x["peak_rss_mib"] for x in r["runs_detail"]) > budget]
        if any(r["verify"] == "FAIL" or r["failed_runs"] for r in rows):
            status = 1
        if over and not status:
            status = 3
        result["scenarios"].append({
            "scenario": sc, "location": loc, "fstype": src.get("fstype"),
            "source": src, "rss_budget_mib": budget if in_scope else None,
            "over_rss_budget": over, "tools": rows})
        md.append(f"### {sc} — {loc} ({src.get('fstype', '?')})")
        md.append("")
        md.append(describe_source(src) + ".")
        md.append("")
        md.append(md_table(rows, baselines))
        md.append("")
        line = ratio_target_line(rows, env)
        if line:
            result["scenarios"][-1]["ratio_target"] = line
            md.append(line[0].upper() + line[1:] + ".")
            md.append("")
        if in_scope:
            md.append(f"blockconv peak RSS budget {budget} MiB: "
                      + ("**exceeded** by " + ", ".join(over) if over else "met") + ".")
            md.append("")
        md.append("Commands: " + "; ".join(f"`{r['command']}`" for r in rows))
        md.append("")
    if warnings:
        md.append("**Warnings:**")
        md.append("")
        md += [f"- {w}" for w in warnings]
        md.append("")
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, "w") as f:
        json.dump(result, f, indent=2)
    print("\n".join(md))
    return status


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "table":
        cmd_table(*sys.argv[2:])
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "final":
        return cmd_final(*sys.argv[2:])
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
