import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { compareImages, convert, MemoryBackend, WorkerGovernor } from '../src/index.js';
import { pattern } from '../src/testkit/index.js';

const MiB = 1024 * 1024;

/** Drives a governor with a synthetic throughput curve (bytes per ms at n workers) and a fake clock. */
function settle(curve: (n: number) => number, max = 32, windows = 40): { final: number; tried: readonly number[] } {
  const g = new WorkerGovernor(max, undefined, 0);
  let now = 0;
  for (let w = 0; w < windows; w++) {
    // One window: 600 ms at the current count.
    for (let step = 0; step < 20; step++) {
      now += 30;
      g.sample(curve(g.active) * 30, now);
    }
  }
  return { final: g.chosen, tried: g.history };
}

test('governor: throughput that saturates: settles on the fewest workers near the top', () => {
  // Each worker adds 10 MB/s until a 120 MB/s link is full (at 12 workers).
  const r = settle((n) => Math.min(n * 10_000, 120_000));
  assert.ok(r.tried.slice(0, 3).join() === '8,16,32', `starts at the default count and climbs by doubling: ${r.tried}`);
  assert.ok(
    Math.min(r.final * 10_000, 120_000) >= 120_000 / 1.05,
    `final ${r.final} within 5% of the best (tried ${r.tried})`,
  );
  assert.ok(r.final <= 24, `no more workers than needed: ${r.final}`);
});

test('governor: throughput that falls past a peak (contention): stays at the peak', () => {
  const curve = (n: number): number => (100_000 * n) / (1 + ((n - 8) / 6) ** 2) / 8;
  const r = settle(curve);
  const best = Math.max(...Array.from({ length: 32 }, (_, i) => curve(i + 1)));
  assert.ok(
    curve(r.final) >= best / 1.05 - 1e-9,
    `final ${r.final} gives ${curve(r.final).toFixed(0)}, best ${best.toFixed(0)} (tried ${r.tried})`,
  );
});

test('governor: flat throughput (one stage is the limit whatever the count): stays at the default count', () => {
  const r = settle(() => 50_000);
  assert.is(r.final, 8, `tried ${r.tried}`);
});

test('governor: a peak below the default count: probes find it', () => {
  // CPU-bound: 3 workers are best, each one more costs 8 %.
  const curve = (n: number): number => 100_000 / (1 + 0.08 * Math.abs(n - 3));
  const r = settle(curve, 32, 120);
  assert.ok(curve(r.final) >= curve(3) / 1.25, `final ${r.final} (tried ${r.tried})`);
  assert.ok(r.final < 8, `moved down from 8: ${r.final} (tried ${r.tried})`);
});

test('governor: never exceeds its maximum', () => {
  const r = settle((n) => n * 100_000, 6);
  assert.ok(
    r.tried.every((n) => n <= 6),
    `${r.tried}`,
  );
  assert.is(r.final, 6);
});

test('convert -m auto: over a slow link model, copies correctly and adapts the workers', async () => {
  // A link: 200 MB/s shared by all requests, 2 ms round trip each.
  let busyUntil = 0;
  const link = (op: string, _off: number, len: number): number => {
    if (op !== 'read' && op !== 'write') return 0;
    const now = performance.now();
    busyUntil = Math.max(now, busyUntil) + len / 200_000;
    return busyUntil - now + 2;
  };
  const size = 192 * MiB;
  const data = pattern(4 * MiB, 7);
  const src = new MemoryBackend({ size, location: 'mem://src', readOnly: false });
  for (let off = 0; off < size; off += 8 * MiB) await src.write(off, data);
  busyUntil = Infinity; // no latency while filling
  const slow = new MemoryBackend({
    size,
    location: 'mem://slow',
    latency: (op, off, len) => (busyUntil === Infinity ? 0 : link(op, off, len)),
    readOnly: false,
  });
  for (let off = 0; off < size; off += 8 * MiB) await slow.write(off, data);
  busyUntil = 0;
  const dst = new MemoryBackend({ size });
  const r = await convert({ sources: [slow], target: dst, workers: 'auto', bufferSize: MiB });
  assert.equal(await compareImages(src, dst), { identical: true });
  assert.ok(r.workersTried && r.workersTried.length >= 1, 'tries are recorded');
  // 4 workers fill this link: climbing further buys nothing. (Counting every worker's
  // bytes per chunk, as an earlier version did, made more workers look faster: it went to 32.)
  assert.ok(r.workers >= 1 && r.workers <= 8, `workers ${r.workers} (tried ${r.workersTried})`);
});

test.run();
