// The request gate: a strict in-memory backend (it rejects any request that breaks its
// limits) behind the gate must take any request at all, and agree with a plain array.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  BlockError,
  MemoryBackend,
  convert,
  gateBackend,
  isGated,
  ungated,
  SegmentList,
  type BlockBackend,
  type CopyRequest,
} from '../src/index.js';

const KiB = 1024;

function strict(
  size: number,
  align: number,
  extra: Partial<MemoryBackend['limits']> = {},
  o: { readOnly?: boolean; latency?: number } = {},
): MemoryBackend {
  return new MemoryBackend({
    size,
    record: true,
    readOnly: o.readOnly,
    latency: o.latency,
    limits: {
      requestAlignment: align,
      maxTransfer: 16 * align,
      optimalTransfer: 8 * align,
      maxWriteZeroes: 4 * align,
      ...extra,
    },
  });
}

/** xorshift: the same sequence on every run. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

function bytes(n: number, seed: number): Uint8Array {
  const r = rng(seed);
  return Uint8Array.from({ length: n }, () => Math.floor(r() * 256));
}

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    assert.instance(err, BlockError);
    return (err as BlockError).code;
  }
  throw new Error('expected a rejection');
}

/** Every logged request respected the backend's limits (MemoryBackend also refuses the rest). */
function assertWithinLimits(mem: MemoryBackend): void {
  const { requestAlignment: a, maxTransfer, maxWriteZeroes } = mem.limits;
  for (const r of mem.log) {
    if (r.op === 'flush') continue;
    assert.ok(r.offset % a === 0, `${r.op} at ${r.offset} is aligned`);
    if (r.op === 'blockStatus') continue;
    assert.ok(
      r.length % a === 0 || r.offset + r.length === mem.size,
      `${r.op} of ${r.length} at ${r.offset} is whole blocks`,
    );
    const max = r.op === 'writeZeroes' || r.op === 'discard' ? (maxWriteZeroes ?? maxTransfer) : maxTransfer;
    if (r.op !== 'writeSegments') assert.ok(r.length <= max, `${r.op} of ${r.length} is at most ${max}`);
  }
}

test('any read, write and zero request agrees with a plain array, and reaches the driver within its limits', async () => {
  for (const [size, align] of [
    [64 * KiB + 1000, 512],
    [32 * KiB, 4096],
    [40 * KiB + 3, 1],
  ] as const) {
    const mem = strict(size, align);
    const gate = gateBackend(mem);
    const model = new Uint8Array(size);
    const r = rng(size);
    for (let i = 0; i < 300; i++) {
      const offset = Math.floor(r() * size);
      const length = Math.min(size - offset, Math.floor(r() * 20 * align) + 1);
      const what = r();
      if (what < 0.4) {
        const data = bytes(length, i);
        await gate.write(offset, data);
        model.set(data, offset);
      } else if (what < 0.55) {
        await gate.writeZeroes(offset, length, { mayUnmap: r() < 0.5 });
        model.fill(0, offset, offset + length);
      } else {
        // An odd view of a larger buffer: memory offsets the driver did not choose.
        const into = new Uint8Array(length + 7).subarray(3, 3 + length);
        const got = await gate.read(offset, length, into);
        assert.is(got.byteOffset, into.byteOffset, "the caller's buffer is filled");
        assert.ok(
          Buffer.from(got).equals(Buffer.from(model.subarray(offset, offset + length))),
          `read ${length} at ${offset} (size ${size}, align ${align})`,
        );
      }
    }
    const all = await gate.read(0, size);
    assert.ok(Buffer.from(all).equals(Buffer.from(model)), `final content (size ${size}, align ${align})`);
    assertWithinLimits(mem);
  }
});

test('concurrent unaligned writes into the same blocks all land (read-modify-writes are serialised)', async () => {
  const mem = strict(16 * KiB, 4096, {}, { latency: 1 });
  const gate = gateBackend(mem);
  const model = new Uint8Array(16 * KiB);
  const writes: Array<Promise<void>> = [];
  // 64 disjoint 100-byte writes spread over four blocks, plus aligned whole-block writes
  // to a neighbour, all in flight at once.
  for (let i = 0; i < 64; i++) {
    const data = bytes(100, i + 1);
    const offset = i * 128 + 17;
    model.set(data, offset);
    writes.push(gate.write(offset, data));
  }
  const whole = bytes(4096, 99);
  model.set(whole, 12 * KiB);
  writes.push(gate.write(12 * KiB, whole));
  await Promise.all(writes);
  assert.ok(Buffer.from(await gate.read(0, 16 * KiB)).equals(Buffer.from(model)));
  assertWithinLimits(mem);
});

test('discard shrinks to whole blocks; the neighbours keep their data', async () => {
  const mem = strict(32 * KiB, 4096);
  const gate = gateBackend(mem);
  const data = bytes(32 * KiB, 5);
  await gate.write(0, data);
  await gate.discard(100, 3 * 4096); // whole blocks inside: 4096..12288
  const got = await gate.read(0, 32 * KiB);
  assert.ok(Buffer.from(got.subarray(0, 4096)).equals(Buffer.from(data.subarray(0, 4096))), 'head block intact');
  assert.ok(Buffer.from(got.subarray(12288)).equals(Buffer.from(data.subarray(12288))), 'tail intact');
  await gate.discard(5, 10); // no whole block: nothing to do
  assertWithinLimits(mem);
});

test('one error code per cause, whatever the driver', async () => {
  const gate = gateBackend(strict(8 * KiB, 512));
  assert.is(await code(gate.read(8 * KiB - 1, 2)), 'ERANGE');
  assert.is(await code(gate.read(-1, 1)), 'ERANGE');
  assert.is(await code(gate.read(0.5, 1)), 'ERANGE');
  assert.is(await code(gate.write(8 * KiB, new Uint8Array(1))), 'ERANGE');
  assert.is(await code(gate.writeZeroes(0, 8 * KiB + 1)), 'ERANGE');
  assert.is(await code(gate.blockStatus(8 * KiB, 1)), 'ERANGE');
  assert.is(await code(gate.read(0, 100, new Uint8Array(10))), 'EINVAL');
  const ro = gateBackend(strict(8 * KiB, 512, {}, { readOnly: true }));
  assert.is(await code(ro.write(0, new Uint8Array(512))), 'EROFS');
  assert.is(await code(ro.writeZeroes(0, 512)), 'EROFS');
  assert.is(await code(ro.discard(0, 512)), 'EROFS');
  assert.ok((await ro.read(8 * KiB - 1, 1)).length === 1, 'the last byte reads');
  await gate.close();
  assert.is(await code(gate.read(0, 512)), 'EBADF');
  assert.is(await code(gate.flush()), 'EBADF');
  await gate.close(); // closing twice is harmless
});

test('a read-only reason the backend gives is the message', async () => {
  const mem = strict(8 * KiB, 1, {}, { readOnly: true });
  Object.defineProperty(mem, 'readOnlyReason', { value: 'a stream cannot be written' });
  const err = await gateBackend(mem)
    .write(0, new Uint8Array(1))
    .catch((e: unknown) => e as BlockError);
  assert.match(String(err), /a stream cannot be written/);
});

test('limits that cannot be honoured are refused when the backend is gated', () => {
  const bad = (limits: object): void => {
    const mem = new MemoryBackend({ size: 4096, limits: limits as MemoryBackend['limits'] });
    assert.throws(
      () => gateBackend(mem),
      (e: unknown) => e instanceof BlockError && e.code === 'EINVAL' && /limits/.test(e.message),
    );
  };
  bad({ requestAlignment: 3 });
  bad({ requestAlignment: 512, maxTransfer: 1000 });
  bad({ requestAlignment: 512, maxTransfer: 4096, optimalTransfer: 8192 });
  bad({ requestAlignment: 512, maxTransfer: 4096, maxWriteZeroes: 100 });
  bad({ requestAlignment: 1, minMemAlignment: 4096 }); // no allocBuffer
});

test('gating is idempotent and keeps every member of the backend', async () => {
  const mem = strict(8 * KiB, 512);
  const gate = gateBackend(mem);
  assert.is(gateBackend(gate), gate);
  assert.ok(isGated(gate) && !isGated(mem));
  assert.is(ungated(gate), mem);
  assert.is(gate.size, mem.size);
  assert.is(gate.driverName, 'mem');
  assert.is((gate as unknown as MemoryBackend).allocatedBytes, 0, 'driver extras are forwarded');
});

test('vectored requests that break the limits fall back to single requests', async () => {
  const mem = strict(64 * KiB, 512);
  const gate = gateBackend(mem) as BlockBackend;
  const data = bytes(64 * KiB, 8);
  // Unaligned pieces, and one longer than maxTransfer (8 KiB).
  await gate.writeSegments!(
    data,
    SegmentList.of([10, 690, 10], [1024, 20 * 512, 1024], [40000, 64 * KiB - 40000, 40000]),
  );
  const got = await gate.read(0, 64 * KiB);
  const want = new Uint8Array(64 * KiB);
  for (const [s, e] of [
    [10, 700],
    [1024, 1024 + 20 * 512],
    [40000, 64 * KiB],
  ] as const)
    want.set(data.subarray(s, e), s);
  assert.ok(Buffer.from(got).equals(Buffer.from(want)));
  assertWithinLimits(mem);
});

test('convert of an odd-sized source onto a 512- and a 4096-byte-block target pads the tail (read-modify-write)', async () => {
  for (const align of [512, 4096]) {
    const size = 1_000_001;
    const source = new MemoryBackend({ size });
    const data = bytes(size, 3);
    await source.write(0, data);
    const target = strict(1 << 20, align, {
      maxTransfer: 256 * KiB,
      optimalTransfer: 256 * KiB,
      maxWriteZeroes: 1 << 20,
    });
    // A target that is not all zeroes beyond the source: the padding must keep it.
    await target.write(1 << 19, new Uint8Array(1 << 19).fill(0xab));
    Object.defineProperty(target, 'zeroInitialized', { value: false });
    target.log.length = 0;
    await convert({ sources: [source], target, workers: 4 });
    assertWithinLimits(target);
    const got = await target.read(0, 1 << 20);
    assert.ok(Buffer.from(got.subarray(0, size)).equals(Buffer.from(data)), `source bytes (align ${align})`);
    assert.ok(
      got.subarray(size).every((b) => b === 0xab),
      `bytes past the source untouched (align ${align})`,
    );
  }
});

test('nothing reaches the driver after close: queued writes, the rest of a split zero request', async () => {
  const mem = strict(1 << 20, 4096, { maxWriteZeroes: 4096 }, { latency: 2 });
  const gate = gateBackend(mem);
  const rmw = gate.write(100, new Uint8Array(10)); // exclusive
  const queued = gate.write(8192, new Uint8Array(4096)); // waits behind it
  const zeroes = gate.writeZeroes(16 * KiB, 64 * KiB); // 16 pieces, one at a time
  await new Promise((r) => setTimeout(r, 5));
  await gate.close();
  const closedAt = mem.log.length;
  const results = await Promise.allSettled([rmw, queued, zeroes]);
  assert.is(mem.log.length, closedAt, 'no request after close');
  assert.ok(
    results.some((r) => r.status === 'rejected' && (r.reason as BlockError).code === 'EBADF'),
    'what was left fails with EBADF',
  );
});

test('a write queued behind a read-modify-write is checked against the size it meets', async () => {
  const mem = strict(64 * KiB, 4096, {}, { latency: 1 });
  let size = 64 * KiB;
  Object.defineProperty(mem, 'size', { get: () => size });
  (mem as unknown as { resize: (n: number) => Promise<void> }).resize = async (n: number) => {
    size = n;
  };
  const gate = gateBackend(mem);
  const rmw = gate.write(100, new Uint8Array(10));
  const shrink = gate.resize!(8192);
  const late = gate.write(32 * KiB, new Uint8Array(4096));
  await rmw;
  await shrink;
  assert.is(await code(late), 'ERANGE');
  assert.ok(
    mem.log.every((r) => r.offset + r.length <= 64 * KiB && (r.op !== 'write' || r.offset < 8192)),
    'nothing past the new end',
  );
});

test('a driver that throws instead of rejecting leaves no unhandled rejection', async () => {
  const mem = strict(1 << 20, 1, { maxTransfer: 4096, optimalTransfer: 4096 });
  let calls = 0;
  const real = mem.write.bind(mem);
  mem.write = (offset: number, data: Uint8Array) => {
    if (++calls === 3) throw new Error('sync');
    return real(offset, data);
  };
  const unhandled: unknown[] = [];
  const onUnhandled = (e: unknown): void => {
    unhandled.push(e);
  };
  process.on('unhandledRejection', onUnhandled);
  try {
    const err = await gateBackend(mem)
      .write(0, new Uint8Array(5 * 4096))
      .then(
        () => undefined,
        (e: unknown) => e as Error,
      );
    assert.match(String(err), /sync/);
    await new Promise((r) => setTimeout(r, 10));
    assert.equal(unhandled, []);
  } finally {
    process.off('unhandledRejection', onUnhandled);
  }
});

test('compressed writes: whole compression units only, split on units within maxTransfer', async () => {
  const mem = strict(1 << 20, 512, { maxTransfer: 128 * KiB, optimalTransfer: 64 * KiB, compressionUnit: 64 * KiB });
  const gate = gateBackend(mem);
  assert.is(await code(gate.write(4096, new Uint8Array(64 * KiB), { compress: true })), 'EINVAL');
  await gate.write(64 * KiB, new Uint8Array(320 * KiB), { compress: true });
  const writes = mem.log.filter((r) => r.op === 'write');
  assert.ok(
    writes.every((r) => r.offset % (64 * KiB) === 0 && r.length % (64 * KiB) === 0 && r.length <= 128 * KiB),
    'whole units, within maxTransfer',
  );
  assert.throws(
    () =>
      gateBackend(strict(1 << 20, 512, { maxTransfer: 64 * KiB, optimalTransfer: 64 * KiB, compressionUnit: 1 << 20 })),
    /compressionUnit/,
  );
});

test('the pieces of a split write go one at a time to a target that takes one write at a time', async () => {
  const mem = new MemoryBackend({
    size: 1 << 20,
    latency: 1,
    canWriteOutOfOrder: false,
    limits: { requestAlignment: 1, maxTransfer: 4096, optimalTransfer: 4096 },
  });
  await gateBackend(mem).write(0, new Uint8Array(8 * 4096));
  assert.is(mem.maxInFlight, 1);
});

test('copy steps (copyTo/copyFrom) are checked like a read and a write; what would need padding or splitting is declined', async () => {
  const limits = { requestAlignment: 4 * KiB, maxTransfer: 64 * KiB };
  const src = gateBackend(new MemoryBackend({ size: 256 * KiB, limits, canPipe: true }));
  const dst = gateBackend(new MemoryBackend({ size: 256 * KiB, limits, canPipe: true, record: true }));
  const ro = gateBackend(new MemoryBackend({ size: 256 * KiB, limits, canPipe: true, readOnly: true }));
  await src.write(0, new Uint8Array(64 * KiB).fill(7));
  const request: CopyRequest = {
    offload: false,
    buffer: new Uint8Array(128 * KiB),
    holes: new SegmentList(1),
    unit: 4 * KiB,
    minRun: 4 * KiB,
    pieces: new SegmentList(2),
    zeroRuns: new SegmentList(40),
    issued: () => {},
  };
  assert.is(await src.copyTo!(0, 64 * KiB, dst, 0, request), true, 'copied');
  assert.is(request.zeroRuns.count, 0, 'no zero runs');
  assert.is(await src.copyTo!(512, 4 * KiB, dst, 0, request), false, 'unaligned source: declined');
  assert.is(await src.copyTo!(0, 4 * KiB, dst, 512, request), false, 'unaligned target: declined');
  assert.is(await src.copyTo!(0, 128 * KiB, dst, 0, request), false, 'over maxTransfer: declined, not split');
  assert.is(dst.log.filter((e) => e.op === 'pipe').length, 1, 'only the first reached the target');
  const err = await src.copyTo!(0, 4 * KiB, ro, 0, request).catch((e: unknown) => e);
  assert.is((err as BlockError).code, 'EROFS');
  const range = await src.copyTo!(252 * KiB, 8 * KiB, dst, 0, request).catch((e: unknown) => e);
  assert.is((range as BlockError).code, 'ERANGE');
});

test.run();
