import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { SegmentList, ZeroScanner } from '../src/index.js';

const KiB = 1024;

/** Data and zero segments of the last scan, in buffer order: [start, end, isZero]. */
function segments(s: ZeroScanner): Array<[number, number, boolean]> {
  const out: Array<[number, number, boolean]> = [];
  for (const [list, zero] of [
    [s.data, false],
    [s.zeroes, true],
  ] as const) {
    for (let i = 0; i < list.count; i++) out.push([list.positionAt(i), list.positionAt(i) + list.lengthAt(i), zero]);
  }
  return out.sort((a, b) => a[0] - b[0]);
}

/** Known holes at buffer positions (a scan at base 0: offset = position). */
function holes(...pairs: Array<[number, number]>): SegmentList {
  return SegmentList.of(...pairs.map(([a, b]) => [a, b - a, a] as const));
}

test('all data, all zero, and runs at unit granularity', () => {
  const buf = Buffer.alloc(256 * KiB, 1);
  const s = new ZeroScanner(buf, 512, 4 * KiB);
  s.scan(buf.length);
  assert.equal(segments(s), [[0, 256 * KiB, false]]);
  buf.fill(0);
  s.scan(buf.length);
  assert.equal(segments(s), [[0, 256 * KiB, true]]);
  buf.fill(7, 0, 512);
  buf.fill(7, 100 * KiB, 100 * KiB + 1);
  s.scan(buf.length);
  assert.equal(segments(s), [
    [0, 512, false],
    [512, 100 * KiB, true],
    [100 * KiB, 100 * KiB + 512, false],
    [100 * KiB + 512, 256 * KiB, true],
  ]);
});

test('runs shorter than minRun stay data; a non-zero byte late in a unit is found', () => {
  const buf = Buffer.alloc(64 * KiB, 9);
  buf.fill(0, 8 * KiB, 11 * KiB); // 3 KiB < 4 KiB
  buf.fill(0, 20 * KiB, 40 * KiB);
  buf[30 * KiB + 511] = 1; // breaks the second run into 10 KiB + 9.5 KiB (rounded to units)
  const s = new ZeroScanner(buf, 512, 4 * KiB);
  s.scan(buf.length);
  assert.equal(segments(s), [
    [0, 20 * KiB, false],
    [20 * KiB, 30 * KiB, true],
    [30 * KiB, 30 * KiB + 512, false],
    [30 * KiB + 512, 40 * KiB, true],
    [40 * KiB, 64 * KiB, false],
  ]);
});

test('a tail shorter than one unit is data', () => {
  const buf = Buffer.alloc(8 * KiB + 100);
  const s = new ZeroScanner(buf, 4096, 4096);
  s.scan(buf.length);
  assert.equal(segments(s), [
    [0, 8 * KiB, true],
    [8 * KiB, 8 * KiB + 100, false],
  ]);
});

test('known holes are zero segments without a look at their bytes, joined to zero runs beside them', () => {
  const buf = Buffer.alloc(64 * KiB, 5);
  buf.fill(0xee, 8 * KiB, 16 * KiB); // a hole never read: stale bytes
  buf.fill(0, 16 * KiB, 24 * KiB); // zeroes in data right after it
  buf.fill(0xee, 40 * KiB, 48 * KiB);
  const s = new ZeroScanner(buf, 4096, 4096);
  const known = holes([8 * KiB, 16 * KiB], [40 * KiB, 48 * KiB]);
  s.scan(buf.length, 0, known);
  assert.equal(segments(s), [
    [0, 8 * KiB, false],
    [8 * KiB, 24 * KiB, true],
    [24 * KiB, 40 * KiB, false],
    [40 * KiB, 48 * KiB, true],
    [48 * KiB, 64 * KiB, false],
  ]);
  assert.equal(s.data.toArray(), [
    { offset: 0, length: 8 * KiB, position: 0 },
    { offset: 24 * KiB, length: 16 * KiB, position: 24 * KiB },
    { offset: 48 * KiB, length: 16 * KiB, position: 48 * KiB },
  ]);
  s.scan(buf.length, 1 << 20, known);
  assert.equal(s.zeroes.offsetAt(0), (1 << 20) + 8 * KiB, 'offsets are placed at the base');
  // A hole at the very start and one at the end.
  s.scan(buf.length, 0, holes([0, 8 * KiB], [56 * KiB, 64 * KiB]));
  assert.equal(segments(s), [
    [0, 8 * KiB, true],
    [8 * KiB, 16 * KiB, false],
    [16 * KiB, 24 * KiB, true],
    [24 * KiB, 56 * KiB, false],
    [56 * KiB, 64 * KiB, true],
  ]);
});

test('random placement agrees with a byte-by-byte reference', () => {
  let seed = 42;
  const rnd = (n: number): number => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  for (let iter = 0; iter < 50; iter++) {
    const len = 512 * (1 + rnd(400));
    const buf = Buffer.alloc(len);
    for (let k = rnd(20); k > 0; k--) buf[rnd(len)] = 1 + rnd(255);
    const s = new ZeroScanner(buf, 512, 2048);
    s.scan(len);
    let pos = 0;
    for (const [a, b, z] of segments(s)) {
      assert.is(a, pos);
      if (z) {
        assert.ok(
          buf.subarray(a, b).every((v) => v === 0),
          'zero segment is zero',
        );
        assert.ok(b - a >= 2048, 'zero segment long enough');
      }
      pos = b;
    }
    assert.is(pos, len);
    // Every 4 aligned zero sectors in a row must be inside some zero segment.
    for (let u = 0; u + 2048 <= len; u += 512) {
      if (buf.subarray(u, u + 2048).every((v) => v === 0)) {
        assert.ok(
          segments(s).some(([a, b, z]) => z && a <= u && b >= u + 2048),
          `zero run at ${u} detected`,
        );
      }
    }
  }
});

test('units larger than the compare span: runs are still whole units (qcow2 clusters of 128 KiB to 2 MiB)', () => {
  let seed = 7;
  const rnd = (n: number): number => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  for (const unit of [128 * KiB, 1024 * KiB, 2048 * KiB]) {
    for (let iter = 0; iter < 20; iter++) {
      const units = 1 + rnd(8);
      const len = units * unit;
      const buf = Buffer.alloc(len);
      // Some units hold a byte somewhere, the rest are zero.
      for (let u = 0; u < units; u++) if (rnd(2)) buf[u * unit + rnd(unit)] = 1;
      const s = new ZeroScanner(buf, unit, unit);
      s.scan(len);
      const expected: Array<[number, number, boolean]> = [];
      for (let u = 0; u < units; u++) {
        const zero = buf.subarray(u * unit, (u + 1) * unit).every((v) => v === 0);
        const last = expected[expected.length - 1];
        if (last && last[2] === zero) last[1] += unit;
        else expected.push([u * unit, (u + 1) * unit, zero]);
      }
      assert.equal(segments(s), expected, `unit ${unit}, iteration ${iter}`);
    }
  }
});

test.run();
