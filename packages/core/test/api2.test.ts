/**
 * What API 2 lets a driver leave out, and what it declares as data: capabilities that
 * default to "the method exists", a read-only backend with no write methods, a format
 * found by its magic alone, a format that only reads.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  BLOCK_API_VERSION,
  DriverRegistry,
  MemoryBackend,
  SegmentList,
  convert,
  createMemoryDriver,
  gateBackend,
  matchesMagic,
  type BlockBackend,
  type BlockError,
  type FormatDriver,
} from '../src/index.js';

const KiB = 1024;

/** The smallest backend there is: size, limits, read and close. */
function minimal(bytes: Uint8Array): BlockBackend {
  return {
    driverName: 'tiny',
    location: 'tiny://x',
    size: bytes.length,
    limits: { requestAlignment: 1, maxTransfer: 64 * KiB },
    read: async (o, n, into) => {
      const out = into ? into.subarray(0, n) : new Uint8Array(n);
      out.set(bytes.subarray(o, o + n));
      return out;
    },
    close: async () => {},
  };
}

test('a backend with only read and close: read-only, all data, every method supplied by the gate', async () => {
  const bytes = Uint8Array.from({ length: 8 * KiB }, (_, i) => i & 0xff);
  const g = gateBackend(minimal(bytes));
  assert.is(g.readOnly, true, 'no write(): read-only');
  assert.equal(
    [g.canZero, g.canDiscard, g.canBlockStatus, g.canFastZero, g.canCompress, g.zeroInitialized],
    [false, false, false, false, false, false],
  );
  assert.is(g.canWriteOutOfOrder, true);
  assert.equal(await g.blockStatus(100, 10), { kind: 'data', length: 8 * KiB - 100 });
  await g.flush();
  const err = (await g.write(0, new Uint8Array(1)).catch((e: unknown) => e)) as BlockError;
  assert.is(err.code, 'EROFS');
  const target = new MemoryBackend({ size: 8 * KiB, zeroInitialized: false });
  await convert({ sources: [g], target });
  assert.ok(Buffer.from(await target.read(0, 8 * KiB)).equals(Buffer.from(bytes)));
});

test('a writable backend without writeZeroes gets zeroes written; one that says writable without write() is refused', async () => {
  const m = new MemoryBackend({ size: 4 * KiB, zeroInitialized: false, record: true });
  await m.write(0, new Uint8Array(4 * KiB).fill(9));
  const noZero: BlockBackend = {
    driverName: 'nz',
    location: 'nz://',
    size: m.size,
    limits: m.limits,
    read: m.read.bind(m),
    write: m.write.bind(m),
    close: async () => {},
  };
  const g = gateBackend(noZero);
  assert.is(g.canZero, false);
  await g.writeZeroes(100, 1000);
  const got = await m.read(0, 4 * KiB);
  assert.ok(got.subarray(100, 1100).every((b) => b === 0) && got[99] === 9 && got[1100] === 9);
  assert.throws(
    () => gateBackend({ ...minimal(new Uint8Array(1)), readOnly: false }),
    /writable image without write\(\)/,
  );
});

test('magic: a format without probe() is found by its byte strings, each at its offset', async () => {
  const mem = createMemoryDriver();
  const raw: FormatDriver = {
    apiVersion: BLOCK_API_VERSION,
    kind: 'format',
    name: 'raw',
    probe: () => 1,
    open: async (f) => f,
    create: async () => {},
    protocolSizeFor: (n) => n,
  };
  const desc: FormatDriver = {
    apiVersion: BLOCK_API_VERSION,
    kind: 'format',
    name: 'desc',
    readOnly: true,
    magic: [
      { offset: 0, bytes: '# Disk DescriptorFile' },
      { offset: 512, bytes: Uint8Array.of(0x4b, 0x44, 0x4d, 0x56) },
    ],
    open: async (f) => f,
  };
  const reg = new DriverRegistry().register(mem, raw, desc);
  for (const [name, at, bytes] of [
    ['a', 0, new TextEncoder().encode('# Disk DescriptorFile\n')],
    ['b', 512, Uint8Array.of(0x4b, 0x44, 0x4d, 0x56)],
    ['c', 3, Uint8Array.of(1)],
  ] as const) {
    const img = new MemoryBackend({ size: 4 * KiB, location: `mem://${name}` });
    await img.write(at, bytes);
    mem.images.set(`mem://${name}`, img);
  }
  assert.is((await reg.open('mem://a')).driverName, 'mem');
  assert.is((await reg.probe(mem.images.get('mem://a')!, 'mem://a')).name, 'desc');
  assert.is((await reg.probe(mem.images.get('mem://b')!, 'mem://b')).name, 'desc');
  assert.is((await reg.probe(mem.images.get('mem://c')!, 'mem://c')).name, 'raw');
  assert.ok(matchesMagic([{ offset: 2, bytes: 'ab' }], new TextEncoder().encode('xxab')));
  assert.not.ok(
    matchesMagic([{ offset: 3, bytes: 'ab' }], new TextEncoder().encode('xxab')),
    'past the head is no match',
  );
  // readOnly: opened read-only with the reason, never created.
  const opened = await reg.open('mem://a', { format: 'desc' });
  assert.is(opened.readOnly, true);
  assert.match(opened.readOnlyReason ?? '', /the desc format driver only reads/);
  const refused = (await reg.create('mem://new', 4 * KiB, { format: 'desc' }).catch((e: unknown) => e)) as BlockError;
  assert.is(refused.code, 'EROFS');
  assert.not.ok(mem.images.has('mem://new'), 'nothing created');
});

test('SegmentList: accessors, append joins touching runs, a full list throws', () => {
  const l = new SegmentList(2);
  l.append(100, 10, 0);
  l.append(110, 5, 10);
  assert.is(l.count, 1, 'continues both in the image and in the buffer');
  l.append(200, 5, 15);
  assert.equal(l.toArray(), [
    { offset: 100, length: 15, position: 0 },
    { offset: 200, length: 5, position: 15 },
  ]);
  assert.is(l.endAt(1), 205);
  assert.is(l.totalLength(), 20);
  assert.throws(() => l.push(1, 1, 1), /full/);
  assert.throws(() => new SegmentList(new Float64Array(4)), /whole triples/);
});

test.run();
