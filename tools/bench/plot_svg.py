#!/usr/bin/env python3
"""Throughput against worker count as an SVG (no dependencies), for tools/bench-headline.sh.

  plot_svg.py SWEEP.tsv OUT.svg [--title T] [--limit-bps BYTES_PER_S]

SWEEP.tsv: family, workers (a number or "auto"), wall_s, mb_per_s, fraction_of_limit
(headline_report.py writes it). One line per family over log2(workers); "auto" rows are
drawn as a dashed horizontal line (the worker count adapts, so it has no x); the link rate
(when shaped) as a grey line.
"""
import argparse
import csv
import math
from xml.sax.saxutils import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tsv")
    ap.add_argument("out")
    ap.add_argument("--title", default="throughput against worker count")
    ap.add_argument("--limit-bps", type=float, default=0)
    a = ap.parse_args()

    series, autos = {}, {}
    with open(a.tsv, newline="") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            if r["workers"] == "auto":
                autos[r["family"]] = float(r["mb_per_s"])
            else:
                series.setdefault(r["family"], []).append((int(r["workers"]), float(r["mb_per_s"])))
    for pts in series.values():
        pts.sort()

    W, H, L, R, T, B = 760, 440, 70, 210, 50, 55
    pw, ph = W - L - R, H - T - B
    xs = [w for pts in series.values() for w, _ in pts] or [1, 32]
    xmax = max(xs + [32])
    limit = a.limit_bps / 1e6
    ytop = max([y for pts in series.values() for _, y in pts] + list(autos.values()) + [limit, 1]) * 1.12
    step = 10 ** math.floor(math.log10(ytop / 5))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if ytop / (step * m) <= 7)

    def x(w):
        return L + pw * math.log2(w) / math.log2(xmax)

    def y(v):
        return T + ph * (1 - v / ytop)

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         'font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{L + pw / 2}" y="24" text-anchor="middle" font-size="14">{escape(a.title)}</text>']
    v = 0.0
    while v <= ytop + 1e-9:
        o.append(f'<line x1="{L}" y1="{y(v):.1f}" x2="{L + pw}" y2="{y(v):.1f}" stroke="#e5e5e5"/>')
        o.append(f'<text x="{L - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
        v += step
    w = 1
    while w <= xmax:
        o.append(f'<line x1="{x(w):.1f}" y1="{T}" x2="{x(w):.1f}" y2="{T + ph}" stroke="#f0f0f0"/>')
        o.append(f'<text x="{x(w):.1f}" y="{T + ph + 16}" text-anchor="middle">{w}</text>')
        w *= 2
    o.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    o.append(f'<text x="{L + pw / 2}" y="{H - 14}" text-anchor="middle">workers (-m N)</text>')
    o.append(f'<text transform="translate(18 {T + ph / 2}) rotate(-90)" text-anchor="middle">'
             'MB/s (allocated bytes / wall time)</text>')
    legend = []
    if limit:
        o.append(f'<line x1="{L}" y1="{y(limit):.1f}" x2="{L + pw}" y2="{y(limit):.1f}" stroke="#888" stroke-width="2"/>')
        o.append(f'<line x1="{L}" y1="{y(0.95 * limit):.1f}" x2="{L + pw}" y2="{y(0.95 * limit):.1f}" '
                 'stroke="#bbb" stroke-dasharray="2 3"/>')
        legend.append(("#888", "", f"link rate {limit:g} MB/s"))
        legend.append(("#bbb", "2 3", "0.95 of it"))
    for i, (fam, pts) in enumerate(sorted(series.items())):
        c = COLORS[i % len(COLORS)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{x(wk):.1f},{y(v):.1f}" for j, (wk, v) in enumerate(pts))
        o.append(f'<path d="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for wk, v in pts:
            o.append(f'<circle cx="{x(wk):.1f}" cy="{y(v):.1f}" r="3.5" fill="{c}"><title>{escape(fam)} -m {wk}: '
                     f'{v:.0f} MB/s</title></circle>')
        legend.append((c, "", f"{fam} -m N"))
        if fam in autos:
            av = autos[fam]
            o.append(f'<line x1="{L}" y1="{y(av):.1f}" x2="{L + pw}" y2="{y(av):.1f}" stroke="{c}" '
                     'stroke-width="1.5" stroke-dasharray="7 4"/>')
            legend.append((c, "7 4", f"{fam} -m auto ({av:.0f} MB/s)"))
    ly = T + 8
    for c, dash, text in legend:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        o.append(f'<line x1="{L + pw + 14}" y1="{ly}" x2="{L + pw + 40}" y2="{ly}" stroke="{c}" stroke-width="2"{d}/>')
        o.append(f'<text x="{L + pw + 46}" y="{ly + 4}">{escape(text)}</text>')
        ly += 20
    o.append("</svg>")
    with open(a.out, "w") as f:
        f.write("\n".join(o) + "\n")


if __name__ == "__main__":
    main()
