/**
 * The scheduler's parts on their own, beside convert()'s tests: the plan (plan.ts), the
 * cursor (cursor.ts), the write order (order.ts) and one worker's chunk copier
 * (copier.ts), each driven directly over in-memory backends.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { MemoryBackend, gateBackend } from '../src/index.js';
import { ChunkCopier, CopyOffload, CopyStats } from '../src/convert/copier.js';
import { ChunkCursor, holeList, type Chunk } from '../src/convert/cursor.js';
import { WriteOrder } from '../src/convert/order.js';
import { planConvert } from '../src/convert/plan.js';
import { pattern } from '../src/testkit/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** 4 MiB: data [0, 1 MiB), a 64 KiB hole, data [1 MiB + 64 KiB, 1 MiB + 128 KiB), zeroes after. */
async function sourceImage(): Promise<MemoryBackend> {
  const m = new MemoryBackend({ size: 4 * MiB, location: 'mem://src' });
  await m.write(0, pattern(MiB, 1));
  await m.write(MiB + 64 * KiB, pattern(64 * KiB, 2));
  return m;
}

test("plan: sizes and modes derived once from the options and both sides' limits", () => {
  const source = new MemoryBackend({ size: 8 * MiB, limits: { maxTransfer: MiB } });
  const target = new MemoryBackend({
    size: 8 * MiB,
    limits: { requestAlignment: 512, preferredAlignment: 64 * KiB },
    zeroInitialized: true,
  });
  const p = planConvert({ sources: [source], target, workers: 4, bufferSize: 4 * MiB });
  assert.is(p.bufferSize, MiB, 'the buffer is cut to the smallest maxTransfer');
  assert.is(p.chunkAlign, 64 * KiB, "chunks on the target's preferred alignment");
  assert.is(p.targetZero, true, 'zeroInitialized: zeroes are skipped');
  assert.is(p.outOfOrder, false);
  assert.is(p.pipe, false, 'no copyFrom on the target: no copy steps');
  const serial = planConvert({
    sources: [source],
    target: new MemoryBackend({ size: 8 * MiB, canWriteOutOfOrder: false }),
    outOfOrder: true,
  });
  assert.is(serial.outOfOrder, false, '-W is not taken by a one-at-a-time target');
  assert.is(serial.serialized, true);
  const piping = planConvert({ sources: [source], target: new MemoryBackend({ size: 8 * MiB, canPipe: true }) });
  assert.is(piping.pipe, true);
  assert.is(
    planConvert({ sources: [source], target: new MemoryBackend({ size: 8 * MiB, canPipe: true }), checksum: true })
      .pipe,
    false,
    'a checksum needs the bytes',
  );
  assert.throws(
    () => planConvert({ sources: [source], target: new MemoryBackend({ size: MiB }) }),
    /smaller than the source/,
  );
});

test('cursor: data chunks up to the buffer, small holes merged with their place in the chunk, zero extents as one chunk', async () => {
  const src = gateBackend(await sourceImage());
  const cursor = new ChunkCursor([src], 4 * KiB, 2 * MiB, 64 * MiB, false, 4 * KiB, 4 * KiB);
  const holes = holeList();
  const chunks: Array<Omit<Chunk, 'source'> & { holes: ReturnType<typeof holes.toArray> }> = [];
  for (let c = await cursor.next(holes); c; c = await cursor.next(holes)) {
    const { source: _, ...rest } = c;
    chunks.push({ ...rest, holes: holes.toArray() });
  }
  assert.equal(
    chunks.map((c) => [c.seq, c.kind, c.sourceOffset, c.length]),
    [
      [0, 'data', 0, MiB + 128 * KiB],
      [1, 'zero', MiB + 128 * KiB, 4 * MiB - MiB - 128 * KiB],
    ],
  );
  assert.equal(
    chunks[0]!.holes,
    [{ offset: MiB, length: 64 * KiB, position: MiB }],
    'the hole: its source offset and its place in the chunk',
  );
  assert.equal(chunks[1]!.holes, [], 'a chunk without holes leaves the list empty');
  // A buffer the first data run fills: the hole is a zero chunk of its own.
  const small = new ChunkCursor([src], 4 * KiB, MiB, 64 * MiB, false, 4 * KiB, 4 * KiB);
  const kinds: string[] = [];
  for (let c = await small.next(holes); c; c = await small.next(holes)) kinds.push(`${c.kind}@${c.sourceOffset}`);
  assert.equal(kinds, ['data@0', `zero@${MiB}`, `data@${MiB + 64 * KiB}`, `zero@${MiB + 128 * KiB}`]);
  // -S 0: all data, no block status asked.
  const all = new ChunkCursor([src], 4 * KiB, MiB, 64 * MiB, true, 0, 4 * KiB);
  let n = 0;
  for (let c = await all.next(holes); c; c = await all.next(holes)) {
    assert.is(c.kind, 'data');
    n++;
  }
  assert.is(n, 4);
});

test('write order: chunk N issues after N-1; releaseAll wakes every waiter', async () => {
  const order = new WriteOrder();
  assert.is(order.turn(0), undefined, 'the first chunk goes at once');
  const seen: number[] = [];
  const two = order.turn(2)!.then(() => seen.push(2));
  const one = order.turn(1)!.then(() => seen.push(1));
  order.done(0);
  await one;
  assert.equal(seen, [1]);
  order.done(1);
  await two;
  assert.equal(seen, [1, 2]);
  const stuck = order.turn(9)!;
  order.releaseAll();
  await stuck;
});

test('copier: one mode per chunk; a data chunk written as its data segments, its zero runs skipped on a zero target', async () => {
  const src = await sourceImage();
  await src.write(256 * KiB, new Uint8Array(128 * KiB)); // a run of written zeroes inside the data
  const target = new MemoryBackend({ size: 4 * MiB, record: true });
  const plan = planConvert({ sources: [src], target, bufferSize: MiB });
  const stats = new CopyStats();
  const released: number[] = [];
  const copier = new ChunkCopier(
    plan,
    stats,
    () => new Uint8Array(MiB),
    (seq) => released.push(seq),
    new CopyOffload(false),
  );
  const data: Chunk = { seq: 0, source: plan.sources[0]!, sourceOffset: 0, targetOffset: 0, length: MiB, kind: 'data' };
  const zero: Chunk = {
    seq: 1,
    source: plan.sources[0]!,
    sourceOffset: MiB + 128 * KiB,
    targetOffset: MiB + 128 * KiB,
    length: MiB,
    kind: 'zero',
  };
  assert.is(copier.modeOf(data), 'data');
  assert.is(copier.modeOf(zero), 'zero');
  await copier.read(data, 'data');
  await copier.write(data, 'data');
  await copier.write(zero, 'zero');
  assert.equal(released, [0, 1], 'each chunk passed the turn on once its writes were issued');
  const writes = target.log.filter((e) => e.op !== 'read').map((e) => [e.op, e.offset, e.length]);
  assert.equal(
    writes,
    [['writeSegments', 0, MiB]],
    'one vectored write of the data around the zero run; the zeroes skipped',
  );
  assert.is(stats.bytesWritten, MiB - 128 * KiB);
  assert.is(stats.bytesSkipped, 128 * KiB + MiB);
  assert.ok(Buffer.from(await target.read(0, MiB)).equals(Buffer.from(await src.read(0, MiB))));
  // A source and target that copy between themselves: the 'copy' mode.
  const piped = planConvert({
    sources: [new MemoryBackend({ size: 4 * MiB, canPipe: true })],
    target: new MemoryBackend({ size: 4 * MiB, canPipe: true }),
  });
  const c2 = new ChunkCopier(
    piped,
    new CopyStats(),
    () => new Uint8Array(0),
    () => {},
    new CopyOffload(false),
  );
  assert.is(c2.modeOf({ ...data, source: piped.sources[0]! }), 'copy');
});

test.run();
