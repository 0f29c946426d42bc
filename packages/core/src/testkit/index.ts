/**
 * Driver conformance kit: uvu suites that check a BlockBackend keeps the contract the
 * core relies on (types.ts). Any driver package runs it against its own backend:
 *
 *   import { conformance } from '@blockconv/core/testkit';
 *   conformance('file', { open: async () => ({ backend, cleanup }) });
 *
 * Two kinds of checks: the driver itself (the backend behind any request gate) must
 * serve every request its declared limits allow, up to the edges (the last byte, the
 * largest transfer, many requests in flight); and behind the core's gate, as the
 * registry hands it out, any request must work or fail with the documented code.
 */
import * as fs from 'node:fs/promises';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { BlockError } from '../errors.js';
import { gateBackend, ungated } from '../gate.js';
import { SegmentList } from '../segments.js';
import type { BlockBackend, GatedBackend } from '../types.js';

export interface ConformanceTarget {
  readonly backend: BlockBackend;
  /** Opens the same image again (after `backend` was closed), to check persistence. */
  readonly reopen?: () => Promise<BlockBackend>;
  /** Opens the same image read-only. */
  readonly openReadOnly?: () => Promise<BlockBackend>;
  readonly cleanup?: () => Promise<void>;
}

export interface ConformanceOptions {
  /**
   * Opens the backend under test. Writable drivers: a fresh image of at least 8 MiB
   * whose content the kit may change. Read-only drivers (readOnly): any image, opened
   * read-only, ideally with data, zeroes and holes, and at least 8 KiB. A protocol
   * driver returns its own backend; a format driver the backend of its open() over a
   * file (the simplest way: `registry.open(path, { format })` of a registry that holds
   * the driver and a protocol, which also puts the core's gate in front, as users get it).
   */
  readonly open: () => Promise<ConformanceTarget>;
  /** Skip checks that need writing (read-only drivers). */
  readonly readOnly?: boolean;
  /**
   * What the image must read as: its bytes, the path of a raw file holding them (e.g. a
   * `qemu-img convert -O raw` of the image), or another backend. With it, the kit reads
   * the whole image and compares, and checks block status against it: a zero extent
   * must be zeroes there, and bytes that are not zero must lie in data extents.
   */
  readonly reference?: Uint8Array | string | BlockBackend;
}

/** Reads `length` bytes at `offset` of a reference. */
type ReferenceReader = {
  readonly size: number;
  read(offset: number, length: number): Promise<Uint8Array>;
  close(): Promise<void>;
};

async function openReference(ref: Uint8Array | string | BlockBackend): Promise<ReferenceReader> {
  if (ref instanceof Uint8Array)
    return { size: ref.length, read: async (o, n) => ref.subarray(o, o + n), close: async () => {} };
  if (typeof ref === 'string') {
    const fh = await fs.open(ref, 'r');
    const size = (await fh.stat()).size;
    return {
      size,
      read: async (o, n) => {
        const out = new Uint8Array(n);
        const { bytesRead } = await fh.read(out, 0, n, o);
        return out.subarray(0, bytesRead);
      },
      close: () => fh.close(),
    };
  }
  const g = gateBackend(ref);
  return { size: g.size, read: (o, n) => g.read(o, n), close: async () => {} };
}

/** Bytes compared per step when checking against a reference. */
const REFERENCE_STEP = 1 << 20;

/** The whole image reads as the reference, and block status agrees with it. */
async function checkReference(b: GatedBackend, ref: ReferenceReader, label: string): Promise<void> {
  assert.is(b.size, ref.size, `${label}: size ${b.size} is the reference's ${ref.size}`);
  for (let pos = 0; pos < b.size; pos += REFERENCE_STEP) {
    const n = Math.min(REFERENCE_STEP, b.size - pos);
    const [got, want] = await Promise.all([b.read(pos, n), ref.read(pos, n)]);
    if (!Buffer.from(got).equals(Buffer.from(want))) {
      let i = 0;
      while (i < n && got[i] === want[i]) i++;
      assert.unreachable(`${label}: byte ${pos + i} reads ${got[i]}, the reference has ${want[i]}`);
    }
  }
  for (let pos = 0, n = 0; pos < b.size && n++ < 100000; ) {
    const ext = await b.blockStatus(pos, b.size - pos);
    const end = Math.min(b.size, pos + ext.length);
    if (ext.kind !== 'data') {
      for (let at = pos; at < end; at += REFERENCE_STEP) {
        const bytes = await ref.read(at, Math.min(REFERENCE_STEP, end - at));
        const i = bytes.findIndex((x) => x !== 0);
        assert.ok(
          i < 0,
          `${label}: block status says ${ext.kind} at [${pos}, ${end}), the reference has data at ${at + i}`,
        );
      }
    }
    pos = end;
  }
}

/** Deterministic pattern bytes, different for every offset and seed. */
export function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
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

/** Writes `data` at `offset` in requests of at most maxTransfer, as the gate would split it. */
async function writeAll(b: GatedBackend, offset: number, data: Uint8Array): Promise<void> {
  const max = b.limits.maxTransfer;
  const parts: Promise<void>[] = [];
  for (let at = 0; at < data.length; at += max)
    parts.push(b.write(offset + at, data.subarray(at, Math.min(data.length, at + max))));
  await Promise.all(parts);
}

/** Reads `length` bytes at `offset` into `into` in requests of at most maxTransfer; returns the filled view. */
async function readAll(b: BlockBackend, offset: number, length: number, into: Uint8Array): Promise<Uint8Array> {
  const max = b.limits.maxTransfer;
  const parts: Promise<Uint8Array>[] = [];
  for (let at = 0; at < length; at += max)
    parts.push(b.read(offset + at, Math.min(max, length - at), into.subarray(at)));
  await Promise.all(parts);
  return into.subarray(0, length);
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
  throw new assert.Assertion({
    message: `${what}: should have failed`,
    generated: false,
    operator: 'rejects',
    expects: 'rejection',
    actual: 'resolved',
  });
}

/** The backend as the registry hands it out, and the driver's own behind it. */
function layers(b: BlockBackend): { gate: GatedBackend; driver: BlockBackend } {
  return { gate: gateBackend(b), driver: ungated(b) };
}

/** A triple list from [offset, length, position] arrays. */
function segments(...triples: Array<readonly [number, number, number]>): SegmentList {
  return SegmentList.of(...triples);
}

/** The largest single request the kit makes: maxTransfer, within the image and 16 MiB of memory. */
function largest(b: BlockBackend, max: number): number {
  const a = b.limits.requestAlignment;
  const n = Math.min(max, 16 << 20, b.size);
  return n - (n % a);
}

async function expectCode(p: Promise<unknown>, code: string, what: string): Promise<void> {
  const err = await expectBlockError(p, what);
  assert.is(err.code, code, `${what}: code ${code} (got ${err.code}: ${err.message})`);
}

/** Checks for any open backend, read-only or not: reads at the edges of the limits, and errors. */
async function readEdges(b: BlockBackend, label: string): Promise<void> {
  const { gate, driver } = layers(b);
  const a = driver.limits.requestAlignment;
  const size = driver.size;
  // The driver: the last whole block, or the part block at an unaligned end.
  const lastStart = size % a === 0 ? size - a : size - (size % a);
  const last = await driver.read(lastStart, size - lastStart, buffer(driver, a));
  assert.is(last.length, size - lastStart, `${label}: the driver reads the last block`);
  // The largest transfer and many reads in flight, against single small reads.
  const big = largest(driver, driver.limits.maxTransfer);
  const whole = await driver.read(0, big, buffer(driver, big));
  assert.is(whole.length, big, `${label}: the driver reads maxTransfer (${big} bytes) at once`);
  const piece = Math.max(a, big >= 64 * a ? big / 64 - ((big / 64) % a) : a);
  const count = Math.min(64, Math.floor(big / piece));
  const parts = await Promise.all(
    Array.from({ length: count }, (_, i) => driver.read(i * piece, piece, buffer(driver, piece))),
  );
  parts.forEach((p, i) => {
    assert.ok(
      Buffer.from(p).equals(Buffer.from(whole.subarray(i * piece, (i + 1) * piece))),
      `${label}: read ${i} of ${count} in flight agrees with the large read`,
    );
  });
  // Through the gate: any byte range, with the documented codes for what cannot be.
  const tail = await gate.read(size - 1, 1);
  assert.is(tail[0], last[last.length - 1], `${label}: the gate reads the last byte`);
  const odd = Math.min(size - 3, 3 * a + 5);
  const oddRead = await gate.read(3, odd, new Uint8Array(odd + 1).subarray(1));
  if (3 + odd <= big)
    assert.ok(
      Buffer.from(oddRead).equals(Buffer.from(whole.subarray(3, 3 + odd))),
      `${label}: an unaligned read through the gate`,
    );
  await expectCode(gate.read(size - 1, 2), 'ERANGE', `${label}: read past the end`);
  await expectCode(gate.read(-1, 1), 'ERANGE', `${label}: read before the start`);
  await expectCode(gate.blockStatus(size, 1), 'ERANGE', `${label}: block status at the end`);
  const ext = await gate.blockStatus(lastStart, 1);
  assert.ok(ext.length > 0 && lastStart + ext.length <= size, `${label}: block status of the last block`);
}

export function conformance(name: string, options: ConformanceOptions): void {
  const test = suite(`conformance: ${name}`);
  const s = {} as SuiteState;
  test.before.each(async () => {
    s.t = await options.open();
    s.b = gateBackend(s.t.backend);
  });
  test.after.each(async () => {
    await s.b.close().catch(() => {});
    await s.t.cleanup?.();
  });
  readChecks(test, s, name, options);
  if (!options.readOnly) {
    writeChecks(test, s);
    zeroAndPersistenceChecks(test, s);
    segmentChecks(test, s);
  }
  test.run();
}

/** The backend under test, behind its gate (requests that fit its limits pass straight through), per test. */
interface SuiteState {
  t: ConformanceTarget;
  b: GatedBackend;
}

type Suite = ReturnType<typeof suite>;

/** Checks for every backend, read-only or not. */
function readChecks(test: Suite, s: SuiteState, name: string, options: ConformanceOptions): void {
  test('limits are consistent data', () => {
    const l = s.b.limits;
    assert.ok(isPowerOfTwo(l.requestAlignment), `requestAlignment ${l.requestAlignment} is a power of two`);
    assert.ok(
      l.maxTransfer >= l.requestAlignment && l.maxTransfer % l.requestAlignment === 0,
      'maxTransfer is a multiple of the alignment',
    );
    if (l.optimalTransfer !== undefined)
      assert.ok(l.optimalTransfer > 0 && l.optimalTransfer <= l.maxTransfer, 'optimalTransfer within maxTransfer');
    if (l.maxWriteZeroes !== undefined)
      assert.ok(l.maxWriteZeroes >= l.requestAlignment, 'maxWriteZeroes at least one block');
    if ((l.minMemAlignment ?? 1) > 1)
      assert.type(s.b.allocBuffer, 'function', 'minMemAlignment > 1 comes with allocBuffer');
    assert.ok(Number.isSafeInteger(s.b.size) && s.b.size > 0, 'size is a positive integer');
    assert.type(s.b.location, 'string');
  });

  test('block status: extents are contiguous, non-empty, inside the image, and zero extents read as zeroes', async () => {
    let pos = 0;
    let n = 0;
    const buf = buffer(s.b, s.b.limits.requestAlignment * 16);
    while (pos < s.b.size && n++ < 10000) {
      const ext = await s.b.blockStatus(pos, s.b.size - pos);
      assert.ok(ext.length > 0, `extent at ${pos} is not empty`);
      assert.ok(pos + ext.length <= s.b.size, `extent at ${pos} ends inside the image`);
      assert.ok(['data', 'zero', 'unallocated'].includes(ext.kind), `kind ${ext.kind}`);
      if (ext.kind === 'zero') {
        const len = Math.min(buf.length, ext.length - (ext.length % s.b.limits.requestAlignment) || ext.length);
        const got = await s.b.read(pos, len, buf);
        assert.ok(allZero(got), `zero extent at ${pos} reads as zeroes`);
      }
      pos += ext.length;
    }
    assert.is(pos, s.b.size, 'extents cover the image');
  });

  test('block status: a short query may answer with a longer extent, never past the end', async () => {
    const last = s.b.size - s.b.limits.requestAlignment;
    const ext = await s.b.blockStatus(last, 1);
    assert.ok(ext.length >= 1 && last + ext.length <= s.b.size);
  });

  test('read fills the given buffer and returns a view of it', async () => {
    const len = aligned(s.b, 4096);
    const into = buffer(s.b, len * 2);
    const got = await s.b.read(0, len, into);
    assert.is(got.length, len);
    assert.is(got.buffer, into.buffer, "returns a view of the caller's buffer");
  });

  test('reads at the edges of the declared limits: the last block, maxTransfer, many in flight; errors through the gate', async () => {
    await readEdges(s.b, name);
  });

  test('a read-only open: the same reads, and every change refused with EROFS', async () => {
    const ro = options.readOnly ? s.b : await s.t.openReadOnly?.();
    if (!ro) return;
    try {
      assert.ok(ro.readOnly, 'reports readOnly');
      await readEdges(ro, `${name} read-only`);
      const { gate } = layers(ro);
      const a = ro.limits.requestAlignment;
      await expectCode(gate.write(0, buffer(ro, a)), 'EROFS', 'write to read-only');
      await expectCode(gate.writeZeroes(0, a), 'EROFS', 'writeZeroes to read-only');
      await expectCode(gate.discard(0, a), 'EROFS', 'discard on read-only');
    } finally {
      if (ro !== s.b) await ro.close();
    }
  });

  test('reads as the reference, byte for byte, and block status agrees with it (with `reference`)', async () => {
    if (options.reference === undefined) return;
    const ref = await openReference(options.reference);
    try {
      await checkReference(s.b, ref, name);
    } finally {
      await ref.close();
    }
  });

  test('a closed backend refuses requests with EBADF', async () => {
    const { gate } = layers(s.b);
    await gate.close();
    await expectCode(gate.read(0, 1), 'EBADF', 'read after close');
    await gate.close(); // twice is harmless
  });
}

/** Checks that write: the limits' edges, unaligned requests, persistence, zeroes and discards. */
function writeChecks(test: Suite, s: SuiteState): void {
  test('writes at the edges of the declared limits: maxTransfer, maxWriteZeroes, the last block', async () => {
    const { driver } = layers(s.b);
    const a = driver.limits.requestAlignment;
    const big = largest(driver, driver.limits.maxTransfer);
    const w = buffer(driver, big);
    w.set(pattern(big, 61));
    await driver.write!(0, w);
    assert.ok(
      Buffer.from(await driver.read(0, big, buffer(driver, big))).equals(Buffer.from(w)),
      'maxTransfer written at once reads back',
    );
    const zeroes = largest(driver, driver.limits.maxWriteZeroes ?? driver.limits.maxTransfer);
    if (driver.writeZeroes) {
      await driver.writeZeroes(0, Math.min(zeroes, big), { mayUnmap: true });
      assert.ok(
        allZero(await driver.read(0, Math.min(zeroes, big), buffer(driver, Math.min(zeroes, big)))),
        'maxWriteZeroes zeroed at once reads zero',
      );
    }
    const size = driver.size;
    const lastStart = size % a === 0 ? size - a : size - (size % a);
    const tail = buffer(driver, a);
    tail.set(pattern(size - lastStart, 62).subarray(0, size - lastStart));
    await driver.write!(lastStart, tail.subarray(0, size - lastStart));
    assert.ok(
      Buffer.from(await driver.read(lastStart, size - lastStart, buffer(driver, a))).equals(
        Buffer.from(tail.subarray(0, size - lastStart)),
      ),
      'the last block reads back',
    );
  });

  test('unaligned writes and zeroes through the gate land exactly, neighbours intact', async () => {
    const { gate, driver } = layers(s.b);
    const a = driver.limits.requestAlignment;
    const size = driver.size;
    const span = Math.min(size, 8 * a + 8192);
    const start = size - span;
    const model = new Uint8Array(span);
    model.set(pattern(span, 71));
    await gate.write(start, model.slice());
    // An odd piece at an odd offset, the last byte, and zeroes across a block boundary.
    const piece = pattern(a + 3, 72);
    model.set(piece, 5);
    await gate.write(start + 5, piece);
    model[span - 1] = 0x5a;
    await gate.write(size - 1, Uint8Array.of(0x5a));
    model.fill(0, a - 1, 2 * a + 1);
    await gate.writeZeroes(start + a - 1, a + 2);
    const got = await gate.read(start, span);
    assert.ok(Buffer.from(got).equals(Buffer.from(model)), 'content as written, byte for byte');
    await expectCode(gate.write(size - 1, new Uint8Array(2)), 'ERANGE', 'write past the end');
    await expectCode(gate.writeZeroes(size, 1), 'ERANGE', 'writeZeroes past the end');
  });

  test('write then read back, at several aligned offsets and sizes', async () => {
    const a = s.b.limits.requestAlignment;
    const cases = [
      [0, a],
      [a * 3, aligned(s.b, 65536)],
      [aligned(s.b, 1 << 20) + a, aligned(s.b, 300000)],
      [s.b.size - a * 2, a * 2],
    ] as const;
    for (const [off, len] of cases) {
      const data = pattern(len, off + 1);
      const w = buffer(s.b, len);
      w.set(data);
      await writeAll(s.b, off, w);
      const got = await readAll(s.b, off, len, buffer(s.b, len));
      assert.ok(Buffer.from(got).equals(Buffer.from(data)), `data at ${off} (+${len}) reads back`);
    }
  });

  test('write of the largest transfer', async () => {
    const len = Math.min(
      s.b.limits.maxTransfer,
      aligned(s.b, 4 << 20),
      s.b.size - (s.b.size % s.b.limits.requestAlignment),
    );
    const w = buffer(s.b, len);
    w.set(pattern(len, 7));
    await writeAll(s.b, 0, w);
    const got = await readAll(s.b, 0, len, buffer(s.b, len));
    assert.ok(Buffer.from(got).equals(Buffer.from(w)));
  });

  test('concurrent writes to distinct ranges all land', async () => {
    const len = aligned(s.b, 64 * 1024);
    const n = Math.min(16, Math.floor(s.b.size / len));
    await Promise.all(
      Array.from({ length: n }, (_, i) => {
        const w = buffer(s.b, len);
        w.set(pattern(len, 100 + i));
        return writeAll(s.b, i * len, w);
      }),
    );
    const got = await Promise.all(Array.from({ length: n }, (_, i) => readAll(s.b, i * len, len, buffer(s.b, len))));
    got.forEach((g, i) => {
      assert.ok(Buffer.from(g).equals(Buffer.from(pattern(len, 100 + i))), `range ${i}`);
    });
  });
}

/** Zeroes, discards, flushes, and what survives a close. */
function zeroAndPersistenceChecks(test: Suite, s: SuiteState): void {
  test('writeZeroes reads back as zeroes, with and without mayUnmap', async () => {
    const len = aligned(s.b, 256 * 1024);
    const w = buffer(s.b, len * 2);
    w.set(pattern(len * 2, 3));
    await writeAll(s.b, 0, w);
    await s.b.writeZeroes(0, len, { mayUnmap: true });
    await s.b.writeZeroes(len, len / 2, { mayUnmap: false });
    const got = await readAll(s.b, 0, len * 2, buffer(s.b, len * 2));
    assert.ok(allZero(got.subarray(0, len + len / 2)), 'zeroed range reads zero');
    assert.ok(
      Buffer.from(got.subarray(len + len / 2)).equals(Buffer.from(w.subarray(len + len / 2))),
      'neighbouring data intact',
    );
  });

  test('discard succeeds and leaves neighbours intact', async () => {
    const len = aligned(s.b, 128 * 1024);
    const w = buffer(s.b, len * 2);
    w.set(pattern(len * 2, 5));
    await writeAll(s.b, 0, w);
    await s.b.discard(0, len);
    const got = await readAll(s.b, len, len, buffer(s.b, len));
    assert.ok(Buffer.from(got).equals(Buffer.from(w.subarray(len))));
  });

  test('data written and flushed survives close and reopen', async () => {
    if (!s.t.reopen) return;
    const len = aligned(s.b, 8192);
    const off = aligned(s.b, 12345);
    const w = buffer(s.b, len);
    w.set(pattern(len, 11));
    await writeAll(s.b, off, w);
    await s.b.flush();
    await s.b.close();
    s.b = gateBackend(await s.t.reopen());
    const got = await readAll(s.b, off, len, buffer(s.b, len));
    assert.ok(Buffer.from(got).equals(Buffer.from(w)));
  });

  test('flush succeeds', async () => {
    await s.b.flush();
  });
}

/** The vectored requests, when the backend offers them. */
function segmentChecks(test: Suite, s: SuiteState): void {
  test('writeSegments (when offered) writes exactly the listed pieces', async () => {
    if (!s.b.writeSegments) return;
    const a = s.b.limits.requestAlignment;
    const len = aligned(s.b, 256 * 1024);
    const base = aligned(s.b, 1 << 20);
    const old = buffer(s.b, len);
    old.set(pattern(len, 21));
    await writeAll(s.b, base, old);
    const data = buffer(s.b, len);
    data.set(pattern(len, 22));
    const seg = segments([base, a * 2, 0], [base + a * 8, a, a * 8], [base + len - a * 4, a * 4, len - a * 4]);
    await s.b.writeSegments(data, seg);
    seg.array.fill(0); // the caller may reuse the list at once
    const got = await readAll(s.b, base, len, buffer(s.b, len));
    const want = Buffer.from(old);
    for (const [s0, e0] of [
      [0, a * 2],
      [a * 8, a * 9],
      [len - a * 4, len],
    ] as const)
      want.set(data.subarray(s0, e0), s0);
    assert.ok(Buffer.from(got).equals(want), 'listed pieces written, the rest untouched');
  });

  test('writeSegments (when offered) of whole preferred blocks over zeroed space', async () => {
    if (!s.b.writeSegments) return;
    // Whole blocks of the preferred granularity over unmapped zeroes: what convert sends a fresh target.
    const p = Math.max(s.b.limits.requestAlignment, s.b.limits.preferredAlignment ?? 1);
    const len = p * 6;
    const base = aligned(s.b, 4 << 20);
    if (base + len > s.b.size) return;
    await s.b.writeZeroes(base, len, { mayUnmap: true });
    const data = buffer(s.b, len);
    data.set(pattern(len, 23));
    await s.b.writeSegments(data, segments([base, p, 0], [base + 2 * p, 2 * p, 2 * p], [base + 5 * p, p, 5 * p]));
    const got = await readAll(s.b, base, len, buffer(s.b, len));
    const want = Buffer.alloc(len);
    for (const [s0, e0] of [
      [0, p],
      [2 * p, 4 * p],
      [5 * p, 6 * p],
    ] as const)
      want.set(data.subarray(s0, e0), s0);
    assert.ok(Buffer.from(got).equals(want), 'pieces written, the gaps still zero');
  });

  test('writeSegments (when offered) puts each piece at its own offset, from its own position', async () => {
    if (!s.b.writeSegments) return;
    const a = s.b.limits.requestAlignment;
    const len = aligned(s.b, 64 * 1024);
    await writeAll(s.b, 0, buffer(s.b, len * 2).fill(0x11));
    const from = buffer(s.b, len);
    from.set(pattern(len, 41));
    // Out of order, and pieces of the source moved to other places.
    await s.b.writeSegments(from, segments([len, a * 2, 0], [0, a, len - a], [a * 3, a, a]));
    const got = await readAll(s.b, 0, len * 2, buffer(s.b, len * 2));
    const want = Buffer.alloc(len * 2, 0x11);
    want.set(from.subarray(0, a * 2), len);
    want.set(from.subarray(len - a, len), 0);
    want.set(from.subarray(a, a * 2), a * 3);
    assert.ok(Buffer.from(got).equals(want), 'pieces landed where listed');
  });

  test('readSegments (when offered) scatters the listed ranges and touches nothing else', async () => {
    if (!s.b.readSegments) return;
    const a = s.b.limits.requestAlignment;
    const len = aligned(s.b, 64 * 1024);
    const w = buffer(s.b, len * 2);
    w.set(pattern(len * 2, 31));
    await writeAll(s.b, 0, w);
    const into = buffer(s.b, len * 2);
    into.fill(0xee);
    // Out of order, and one piece ending at the end of the written data.
    await s.b.readSegments(into, segments([len, a * 2, 0], [0, a, len], [len * 2 - a, a, len * 2 - a]));
    const want = Buffer.alloc(len * 2, 0xee);
    want.set(w.subarray(len, len + a * 2), 0);
    want.set(w.subarray(0, a), len);
    want.set(w.subarray(len * 2 - a, len * 2), len * 2 - a);
    assert.ok(Buffer.from(into).equals(want));
  });
}
