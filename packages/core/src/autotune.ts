/**
 * `-m auto`: the number of active convert workers, adapted while the copy runs. More
 * requests in flight help until the slowest stage (a link, a server, the CPUs) is
 * saturated; past that they only add memory and contention. The governor measures
 * the data copied per window (bytes of chunks read and written) and climbs: it doubles
 * the workers while each step buys at least CLIMB_GAIN more throughput, settles on the best
 * count seen, and later probes a neighbour now and then, since conditions change during
 * a long copy. The window after each change (and the first) is not measured: new
 * workers first fill their buffers, and a pipeline shrinking drains, either of which
 * would skew it; then two windows are averaged before a count is judged.
 */
import { DEFAULT_WORKERS } from './convert/options.js';

/**
 * Doubling the workers must raise throughput by this factor to be kept (a smaller step,
 * in proportion). Windows are taken at
 * different places of the image, and an image's regions copy at different speeds
 * (large extents against many small ones): on the unshaped lab, with 5 % and then
 * 10 %, that alone took the climb to 16 or 32 workers, slower there than 4 by 15-25 %.
 * Where more requests in flight really pay (a link's latency to cover), doubling them
 * buys far more than this.
 */
const CLIMB_GAIN = 1.25;
/** Counts within this factor of the best rate measured are as good: the fewest is chosen. */
const GAIN = 1.1;

/** Whether going from `from` to `to` workers paid: a gain in proportion to the step (doubling: CLIMB_GAIN). */
function pays(rate: number, base: number, from: number, to: number): boolean {
  return rate >= base * (1 + (CLIMB_GAIN - 1) * (to / from - 1));
}
/** A window lasts at least this long and moves at least MIN_WINDOW_BYTES (noise). */
const MIN_WINDOW_MS = 500;
const MIN_WINDOW_BYTES = 32 * 1024 * 1024;
/** Windows measured at a count before judging it: one alone is too easily a fluke. */
const WINDOWS_PER_COUNT = 2;
/** After settling, try a neighbouring count every this many windows. */
const PROBE_EVERY = 8;

export class WorkerGovernor {
  /** Workers allowed to take chunks now. */
  active: number;
  readonly #max: number;
  readonly #min: number;
  /** Best rate seen per worker count (bytes per ms), smoothed. */
  readonly #rates = new Map<number, number>();
  #windowStart: number;
  #windowBytes = 0;
  #phase: 'climb' | 'settled' | 'probe' = 'climb';
  #settled: number;
  #windows = 0;
  #probeUp = false;
  /** The current window follows a change of count (or the start): it is discarded. */
  #settling = true;
  /** Windows measured at the current count. */
  #atCount = 0;
  /** Counts tried, in order, for the result. */
  readonly history: number[] = [];

  /**
   * Starts where a fixed count would (DEFAULT_WORKERS): a short copy is
   * over before a climb from 2 reaches it (unshaped lab, 2 GiB: auto from 2 took 1.17x
   * the time of -m 8, it never got past 4), and where more requests in flight pay, the
   * climb goes on from there.
   */
  constructor(max: number, start = Math.min(DEFAULT_WORKERS, max), now = performance.now()) {
    this.#max = Math.max(1, max);
    this.#min = 1;
    this.active = Math.max(this.#min, Math.min(start, this.#max));
    this.#settled = this.active;
    this.#windowStart = now;
    this.history.push(this.active);
  }

  /** The count the governor stands by: the active one, except while probing a neighbour. */
  get chosen(): number {
    return this.#phase === 'probe' ? this.#settled : this.active;
  }

  /**
   * Records `bytes` moved (read or written) and returns the number of active workers,
   * changed when a window ends.
   */
  sample(bytes: number, now = performance.now()): number {
    this.#windowBytes += bytes;
    const elapsed = now - this.#windowStart;
    if (elapsed < MIN_WINDOW_MS || this.#windowBytes < MIN_WINDOW_BYTES) return this.active;
    const rate = this.#windowBytes / elapsed;
    this.#windowStart = now;
    this.#windowBytes = 0;
    if (this.#settling) {
      this.#settling = false;
      return this.active;
    }
    this.#windows++;
    const n = this.active;
    const before = this.#rates.get(n);
    // Later windows at a known count refine it (conditions drift); the first stands alone.
    this.#rates.set(n, before === undefined ? rate : (before + rate) / 2);
    if (++this.#atCount < WINDOWS_PER_COUNT) return this.active;
    this.#decide(n);
    if (this.active !== n) {
      this.history.push(this.active);
      this.#settling = true;
      this.#atCount = 0;
    }
    return this.active;
  }

  #decide(n: number): void {
    const rate = this.#rates.get(n)!;
    switch (this.#phase) {
      case 'climb': {
        const below = this.#lowerTried(n);
        const lower = this.#rates.get(below);
        if (lower !== undefined && !pays(rate, lower, below, n)) {
          // The last step did not pay: go back to the best count and stay.
          this.#settle(this.#best());
        } else if (n >= this.#max) {
          this.#settle(n);
        } else {
          this.active = Math.min(this.#max, n * 2);
        }
        return;
      }
      case 'settled':
        if (this.#windows % PROBE_EVERY === 0) {
          // Look next door, a quarter up and a quarter down in turn: the climb's doubling
          // may have stepped over the best count.
          this.#probeUp = !this.#probeUp;
          const target = this.#probeUp
            ? Math.min(this.#max, Math.max(n + 1, Math.ceil(n * 1.25)))
            : Math.max(this.#min, Math.min(n - 1, Math.floor(n / 1.25)));
          if (target !== n) {
            this.#phase = 'probe';
            this.active = target;
          }
        }
        return;
      case 'probe': {
        const home = this.#rates.get(this.#settled)!;
        // Move only for a clear gain; otherwise back home.
        const better = n > this.#settled ? pays(rate, home, this.#settled, n) : rate > home * GAIN;
        this.#settle(better ? n : this.#settled);
        return;
      }
    }
  }

  #settle(n: number): void {
    this.#phase = 'settled';
    this.#settled = n;
    this.active = n;
  }

  /** The highest count below n that was measured (the previous step of the climb). */
  #lowerTried(n: number): number {
    let best = -1;
    for (const k of this.#rates.keys()) if (k < n && k > best) best = k;
    return best;
  }

  /** The fewest workers within GAIN of the best rate measured. */
  #best(): number {
    let top = 0;
    for (const r of this.#rates.values()) top = Math.max(top, r);
    let pick = this.#max;
    for (const [k, r] of this.#rates) if (r * GAIN >= top && k < pick) pick = k;
    return pick;
  }
}
