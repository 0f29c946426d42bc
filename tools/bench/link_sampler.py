#!/usr/bin/env python3
"""Per-link throughput over one benchmark run, to see where a copy loses time on the wire.

  link_sampler.py sample OUT.tsv SPEC ... [--interval S]
      Appends "t  value1  value2 ..." every S seconds (default 0.1) until killed
      (SIGTERM). SPEC is IFACE:rx or IFACE:tx (bytes, from /sys/class/net/IFACE/
      statistics), pid:N (CPU seconds of process N and its threads, from /proc/N/stat;
      0 once it is gone) or cpu (busy CPU seconds of the machine, from /proc/stat);
      NAME=SPEC names the column.
  link_sampler.py summary OUT.tsv --rate BITS_PER_S [--json]
      Per link, over the run (from its first to its last moving sample): the average, the
      1-second windows below half the rate, the longest time it stood still (< 1 % of the
      rate), and how much of that stillness the other links were moving (a pipeline bubble
      on one side) or still too (both waiting); and the CPUs the machine and each sampled
      process kept busy on average meanwhile.
"""
import json
import os
import signal
import sys
import time


TICKS = os.sysconf("SC_CLK_TCK")


def is_link(spec):
    return spec.endswith(":rx") or spec.endswith(":tx")


def read_counter(spec):
    spec = spec.split("=", 1)[-1]  # NAME=SPEC: NAME only labels the column
    if spec == "cpu":
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return round((sum(v) - v[3] - v[4]) / TICKS, 2)  # all but idle and iowait
    if spec.startswith("pid:"):
        try:
            with open(f"/proc/{spec[4:]}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return round((int(fields[11]) + int(fields[12])) / TICKS, 2)  # utime + stime
        except OSError:
            return 0
    iface, direction = spec.rsplit(":", 1)
    with open(f"/sys/class/net/{iface}/statistics/{direction}_bytes") as f:
        return int(f.read())


def sample(out, specs, interval):
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    with open(out, "w") as f:
        f.write("t\t" + "\t".join(specs) + "\n")
        while not stop:
            f.write(f"{time.monotonic() - t0:.3f}\t" + "\t".join(str(read_counter(s)) for s in specs) + "\n")
            f.flush()
            time.sleep(interval)


def summary(path, rate_bps):
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = [[float(x) for x in line.split("\t")] for line in f if line.strip()]
    cols = [k for k, name in enumerate(header[1:]) if is_link(name)]
    links = [header[1 + k] for k in cols]
    cpu_cols = [k for k, name in enumerate(header[1:]) if not is_link(name)]
    all_rows = rows
    rows = [[r[0]] + [r[1 + k] for k in cols] for r in rows]
    if len(rows) < 3:
        return {"error": "too few samples"}
    rate = rate_bps / 8  # bytes/s
    t = [r[0] for r in rows]
    # Byte rate of each interval, per link.
    speeds = [[(rows[i + 1][k + 1] - rows[i][k + 1]) / (t[i + 1] - t[i]) for i in range(len(rows) - 1)] for k in range(len(links))]
    still = [[s < 0.01 * rate for s in link] for link in speeds]
    moving = [i for i in range(len(rows) - 1) if any(not still[k][i] for k in range(len(links)))]
    if not moving:
        return {"error": "no traffic on any link"}
    first, last = moving[0], moving[-1]
    out = {"links": {}, "run_s": round(t[last + 1] - t[first], 2), "cpus": {}}
    # CPUs busy on average while the links moved: the machine ("cpu") and each process.
    for k in cpu_cols:
        a, b = all_rows[first][1 + k], all_rows[last + 1][1 + k]
        if b >= a and b > 0:
            out["cpus"][header[1 + k]] = round((b - a) / (t[last + 1] - t[first]), 2)
    for k, name in enumerate(links):
        total = rows[last + 1][k + 1] - rows[first][k + 1]
        dur = t[last + 1] - t[first]
        # 1-second windows (by sample time) below half the rate.
        slow, w0 = 0, first
        for i in range(first, last + 1):
            if t[i + 1] - t[w0] >= 1.0:
                if (rows[i + 1][k + 1] - rows[w0][k + 1]) / (t[i + 1] - t[w0]) < 0.5 * rate:
                    slow += 1
                w0 = i + 1
        longest, run, still_total, others_moving = 0.0, 0.0, 0.0, 0.0
        for i in range(first, last + 1):
            dt = t[i + 1] - t[i]
            if still[k][i]:
                run += dt
                still_total += dt
                if any(not still[j][i] for j in range(len(links)) if j != k):
                    others_moving += dt
                longest = max(longest, run)
            else:
                run = 0.0
        out["links"][name] = {
            "bytes": int(total),
            "avg_of_rate": round(total / dur / rate, 3),
            "slow_1s_windows": slow,
            "still_s": round(still_total, 2),
            "still_while_others_move_s": round(others_moving, 2),
            "longest_still_s": round(longest, 2),
        }
    return out


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "sample":
        args = sys.argv[2:]
        interval = 0.1
        if "--interval" in args:
            i = args.index("--interval")
            interval = float(args[i + 1])
            del args[i:i + 2]
        sample(args[0], args[1:], interval)
    elif len(sys.argv) >= 3 and sys.argv[1] == "summary":
        args = sys.argv[2:]
        rate = float(args[args.index("--rate") + 1])
        res = summary(args[0], rate)
        if "--json" in args:
            print(json.dumps(res))
        else:
            print(f"{args[0]}: " + (res["error"] if "error" in res else f"run {res['run_s']} s")
                  + "".join(f", {name} {n} CPUs" for name, n in res.get("cpus", {}).items()))
            for name, l in res.get("links", {}).items():
                print(f"  {name}: {l['avg_of_rate']:.3f} of the rate, {l['slow_1s_windows']} 1-s windows under half, "
                      f"still {l['still_s']} s ({l['still_while_others_move_s']} s while the other link moved), longest {l['longest_still_s']} s")
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
