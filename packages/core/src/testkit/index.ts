/**
 * Driver conformance kit: uvu suites that check a BlockBackend keeps the contract the
 * core relies on (types.ts). Any driver package runs it against its own backend:
 *
 *   import { conformance } from '@blockconv/core/testkit';
 *   conformance('file', { open: async () => ({ backend, cleanup }) });
 */
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { BlockError } from '../errors.js';
import type { BlockBackend } from '../types.js';

export interface ConformanceTarget {
  readonly backend: BlockBackend;
  /** Opens the same image again (after `backend` was closed), to check persistence. */
  readonly reopen?: () => Promise<BlockBackend>;
  /** Opens the same image read-only. */
  readonly openReadOnly?: () => Promise<BlockBackend>;
  readonly cleanup?: () => Promise<void>;
}

export interface ConformanceOptions {
  /** Opens a fresh writable image of at least 8 MiB whose content the kit may change. */
  readonly open: () => Promise<ConformanceTarget>;
  /** Skip checks that need writing (read-only drivers). */
  readonly readOnly?: boolean;
}

/** Deterministic pattern bytes, different for every offset and seed. */
export function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

function aligned(b: BlockBackend, n: number): number {
  const a = b.limits.requestAlignment;
  return Math.ceil(n / a) * a;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

function allZero(u: Uint8Array): boolean {
  for (let i = 0; i < u.length; i++) if (u[i] !== 0) return false;
  return true;
}

function buffer(b: BlockBackend, n: number): Uint8Array {
  return b.allocBuffer ? b.allocBuffer(n) : new Uint8Array(n);
}

async function expectBlockError(p: Promise<unknown>, what: string): Promise<BlockError> {
  try {
    await p;
  } catch (err) {
    assert.instance(err, BlockError, `${what}: rejects with a BlockError, got ${String(err)}`);
    assert.ok((err as BlockError).code, `${what}: error has a code`);
    return err as BlockError;
  }
  throw new assert.Assertion({ message: `${what}: should have failed`, generated: false, operator: 'rejects', expects: 'rejection', actual: 'resolved' });
}

export function conformance(name: string, options: ConformanceOptions): void {
  const test = suite(`conformance: ${name}`);
  let t: ConformanceTarget;
  let b: BlockBackend;
  test.before.each(async () => {
    t = await options.open();
    b = t.backend;
  });
  test.after.each(async () => {
    await b.close().catch(() => {});
    await t.cleanup?.();
  });

  test('limits are consistent data', () => {
    const l = b.limits;
    assert.ok(isPowerOfTwo(l.requestAlignment), `requestAlignment ${l.requestAlignment} is a power of two`);
    assert.ok(l.maxTransfer >= l.requestAlignment && l.maxTransfer % l.requestAlignment === 0, 'maxTransfer is a multiple of the alignment');
    assert.ok(l.optimalTransfer > 0 && l.optimalTransfer <= l.maxTransfer, 'optimalTransfer within maxTransfer');
    if (l.maxWriteZeroes !== undefined) assert.ok(l.maxWriteZeroes >= l.requestAlignment, 'maxWriteZeroes at least one block');
    if ((l.minMemAlignment ?? 1) > 1) assert.type(b.allocBuffer, 'function', 'minMemAlignment > 1 comes with allocBuffer');
    assert.ok(Number.isSafeInteger(b.size) && b.size > 0, 'size is a positive integer');
    assert.type(b.location, 'string');
  });

  test('block status: extents are contiguous, non-empty, inside the image, and zero extents read as zeroes', async () => {
    let pos = 0;
    let n = 0;
    const buf = buffer(b, b.limits.requestAlignment * 16);
    while (pos < b.size && n++ < 10000) {
      const ext = await b.blockStatus(pos, b.size - pos);
      assert.ok(ext.length > 0, `extent at ${pos} is not empty`);
      assert.ok(pos + ext.length <= b.size, `extent at ${pos} ends inside the image`);
      assert.ok(['data', 'zero', 'unallocated'].includes(ext.kind), `kind ${ext.kind}`);
      if (ext.kind === 'zero') {
        const len = Math.min(buf.length, ext.length - (ext.length % b.limits.requestAlignment) || ext.length);
        const got = await b.read(pos, len, buf);
        assert.ok(allZero(got), `zero extent at ${pos} reads as zeroes`);
      }
      pos += ext.length;
    }
    assert.is(pos, b.size, 'extents cover the image');
  });

  test('block status: a short query may answer with a longer extent, never past the end', async () => {
    const last = b.size - b.limits.requestAlignment;
    const ext = await b.blockStatus(last, 1);
    assert.ok(ext.length >= 1 && last + ext.length <= b.size);
  });

  test('read fills the given buffer and returns a view of it', async () => {
    const len = aligned(b, 4096);
    const into = buffer(b, len * 2);
    const got = await b.read(0, len, into);
    assert.is(got.length, len);
    assert.is(got.buffer, into.buffer, 'returns a view of the caller\'s buffer');
  });

  if (options.readOnly) {
    test.run();
    return;
  }

  test('write then read back, at several aligned offsets and sizes', async () => {
    const a = b.limits.requestAlignment;
    const cases = [[0, a], [a * 3, aligned(b, 65536)], [aligned(b, 1 << 20) + a, aligned(b, 300000)], [b.size - a * 2, a * 2]] as const;
    for (const [off, len] of cases) {
      const data = pattern(len, off + 1);
      const w = buffer(b, len);
      w.set(data);
      await b.write(off, w);
      const got = await b.read(off, len, buffer(b, len));
      assert.ok(Buffer.from(got).equals(Buffer.from(data)), `data at ${off} (+${len}) reads back`);
    }
  });

  test('write of the largest transfer', async () => {
    const len = Math.min(b.limits.maxTransfer, aligned(b, 4 << 20), b.size - (b.size % b.limits.requestAlignment));
    const w = buffer(b, len);
    w.set(pattern(len, 7));
    await b.write(0, w);
    const got = await b.read(0, len, buffer(b, len));
    assert.ok(Buffer.from(got).equals(Buffer.from(w)));
  });

  test('concurrent writes to distinct ranges all land', async () => {
    const len = aligned(b, 64 * 1024);
    const n = Math.min(16, Math.floor(b.size / len));
    await Promise.all(Array.from({ length: n }, (_, i) => {
      const w = buffer(b, len);
      w.set(pattern(len, 100 + i));
      return b.write(i * len, w);
    }));
    const got = await Promise.all(Array.from({ length: n }, (_, i) => b.read(i * len, len, buffer(b, len))));
    got.forEach((g, i) => assert.ok(Buffer.from(g).equals(Buffer.from(pattern(len, 100 + i))), `range ${i}`));
  });

  test('writeSegments (when offered) writes exactly the listed pieces', async () => {
    if (!b.writeSegments) return;
    const a = b.limits.requestAlignment;
    const len = aligned(b, 256 * 1024);
    const base = aligned(b, 1 << 20);
    const old = buffer(b, len);
    old.set(pattern(len, 21));
    await b.write(base, old);
    const data = buffer(b, len);
    data.set(pattern(len, 22));
    const seg = new Float64Array([0, a * 2, a * 8, a * 9, len - a * 4, len, 999, 999]);
    await b.writeSegments(base, data, seg, 3);
    seg.fill(0); // the caller may reuse the list at once
    const got = await b.read(base, len, buffer(b, len));
    const want = Buffer.from(old);
    for (const [s0, e0] of [[0, a * 2], [a * 8, a * 9], [len - a * 4, len]] as const) want.set(data.subarray(s0, e0), s0);
    assert.ok(Buffer.from(got).equals(want), 'listed pieces written, the rest untouched');
  });

  test('writeSegments (when offered) of whole preferred blocks over zeroed space', async () => {
    if (!b.writeSegments) return;
    // Whole blocks of the preferred granularity over unmapped zeroes: what convert sends a fresh target.
    const p = Math.max(b.limits.requestAlignment, b.limits.preferredAlignment ?? 1);
    const len = p * 6;
    const base = aligned(b, 4 << 20);
    if (base + len > b.size) return;
    await b.writeZeroes(base, len, { mayUnmap: true });
    const data = buffer(b, len);
    data.set(pattern(len, 23));
    await b.writeSegments(base, data, new Float64Array([0, p, 2 * p, 4 * p, 5 * p, 6 * p]), 3);
    const got = await b.read(base, len, buffer(b, len));
    const want = Buffer.alloc(len);
    for (const [s0, e0] of [[0, p], [2 * p, 4 * p], [5 * p, 6 * p]] as const) want.set(data.subarray(s0, e0), s0);
    assert.ok(Buffer.from(got).equals(want), 'pieces written, the gaps still zero');
  });

  test('writeScattered (when offered) puts each piece at its own offset', async () => {
    if (!b.writeScattered) return;
    const a = b.limits.requestAlignment;
    const len = aligned(b, 64 * 1024);
    await b.write(0, buffer(b, len * 2).fill(0x11));
    const from = buffer(b, len);
    from.set(pattern(len, 41));
    // Out of order, and pieces of the source moved to other places.
    await b.writeScattered(from, new Float64Array([len, a * 2, 0, 0, a, len - a, a * 3, a, a]), 3);
    const got = await b.read(0, len * 2, buffer(b, len * 2));
    const want = Buffer.alloc(len * 2, 0x11);
    want.set(from.subarray(0, a * 2), len);
    want.set(from.subarray(len - a, len), 0);
    want.set(from.subarray(a, a * 2), a * 3);
    assert.ok(Buffer.from(got).equals(want), 'pieces landed where listed');
  });

  test('readSegments (when offered) scatters the listed ranges and touches nothing else', async () => {
    if (!b.readSegments) return;
    const a = b.limits.requestAlignment;
    const len = aligned(b, 64 * 1024);
    const w = buffer(b, len * 2);
    w.set(pattern(len * 2, 31));
    await b.write(0, w);
    const into = buffer(b, len * 2);
    into.fill(0xee);
    // Out of order, and one piece ending at the end of the written data.
    const seg = new Float64Array([len, a * 2, 0, 0, a, len, len * 2 - a, a, len * 2 - a]);
    await b.readSegments(into, seg, 3);
    const want = Buffer.alloc(len * 2, 0xee);
    want.set(w.subarray(len, len + a * 2), 0);
    want.set(w.subarray(0, a), len);
    want.set(w.subarray(len * 2 - a, len * 2), len * 2 - a);
    assert.ok(Buffer.from(into).equals(want));
  });

  test('writeZeroes reads back as zeroes, with and without mayUnmap', async () => {
    const len = aligned(b, 256 * 1024);
    const w = buffer(b, len * 2);
    w.set(pattern(len * 2, 3));
    await b.write(0, w);
    await b.writeZeroes(0, len, { mayUnmap: true });
    await b.writeZeroes(len, len / 2, { mayUnmap: false });
    const got = await b.read(0, len * 2, buffer(b, len * 2));
    assert.ok(allZero(got.subarray(0, len + len / 2)), 'zeroed range reads zero');
    assert.ok(Buffer.from(got.subarray(len + len / 2)).equals(Buffer.from(w.subarray(len + len / 2))), 'neighbouring data intact');
  });

  test('discard succeeds and leaves neighbours intact', async () => {
    const len = aligned(b, 128 * 1024);
    const w = buffer(b, len * 2);
    w.set(pattern(len * 2, 5));
    await b.write(0, w);
    await b.discard(0, len);
    const got = await b.read(len, len, buffer(b, len));
    assert.ok(Buffer.from(got).equals(Buffer.from(w.subarray(len))));
  });

  test('data written and flushed survives close and reopen', async () => {
    if (!t.reopen) return;
    const len = aligned(b, 8192);
    const off = aligned(b, 12345);
    const w = buffer(b, len);
    w.set(pattern(len, 11));
    await b.write(off, w);
    await b.flush();
    await b.close();
    b = await t.reopen();
    const got = await b.read(off, len, buffer(b, len));
    assert.ok(Buffer.from(got).equals(Buffer.from(w)));
  });

  test('a read-only open refuses writes with a BlockError', async () => {
    if (!t.openReadOnly) return;
    const ro = await t.openReadOnly();
    try {
      assert.ok(ro.readOnly);
      const len = b.limits.requestAlignment;
      await expectBlockError(ro.write(0, buffer(ro, len)), 'write to read-only');
    } finally {
      await ro.close();
    }
  });

  test('flush succeeds', async () => {
    await b.flush();
  });

  test.run();
}
