"""Per-pair ratios, as issue 16 asks for them: run i of a tool against run i of a
baseline (the same round of the alternation, so the same state of the machine); the
median of those ratios is the figure and their range the spread."""
import statistics


def per_pair(ours, base):
    """ours, base: {run number: seconds}. Returns (median, [min, max], pairs) or (None, None, 0)."""
    pairs = sorted(w / base[i] for i, w in ours.items() if i in base and base[i] > 0)
    if not pairs:
        return None, None, 0
    return statistics.median(pairs), [pairs[0], pairs[-1]], len(pairs)
