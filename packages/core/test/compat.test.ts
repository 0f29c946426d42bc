/**
 * Drivers written against API 1 keep loading and working (compat/api1.ts): their
 * backends are seen as API 2 ones, and what they receive (a format's file, a resolved
 * backing image) is shown to them as API 1.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  DriverRegistry,
  MemoryBackend,
  compareImages,
  convert,
  createMemoryDriver,
  type BlockDriver,
} from '../src/index.js';
import { pattern } from '../src/testkit/index.js';

const KiB = 1024;

/** A protocol driver as API 1 wrote one: its own capability names, pair and triple segment lists. */
function api1Protocol(images: Map<string, MemoryBackend>): BlockDriver {
  const seen: string[] = [];
  const driver = {
    apiVersion: 1,
    kind: 'protocol',
    name: 'old',
    schemes: ['old'],
    seen,
    async open(location: string) {
      const m = images.get(location)!;
      return {
        driverName: 'old',
        location,
        size: m.size,
        readOnly: false,
        limits: { requestAlignment: 512, maxTransfer: 64 * KiB, optimalTransfer: 64 * KiB },
        canWriteZeroes: true,
        canDiscard: false,
        readsZeroesInitially: false,
        canCompress: false,
        hasBlockStatus: true,
        read: (o: number, n: number, into?: Uint8Array) => m.read(o, n, into),
        readSegments: async (into: Uint8Array, triples: Float64Array, count: number) => {
          seen.push('readSegments');
          for (let i = 0; i < count; i++)
            await m.read(triples[3 * i]!, triples[3 * i + 1]!, into.subarray(triples[3 * i + 2]!));
        },
        write: (o: number, d: Uint8Array) => m.write(o, d),
        writeScattered: async (from: Uint8Array, triples: Float64Array, count: number) => {
          seen.push('writeScattered');
          for (let i = 0; i < count; i++)
            await m.write(
              triples[3 * i]!,
              from.subarray(triples[3 * i + 2]!, triples[3 * i + 2]! + triples[3 * i + 1]!),
            );
        },
        writeZeroes: (o: number, n: number) => m.writeZeroes(o, n),
        discard: async () => {},
        blockStatus: (o: number, n: number) => m.blockStatus(o, n),
        flush: () => m.flush(),
        close: async () => {},
      };
    },
    async create(location: string, size: number) {
      images.set(location, new MemoryBackend({ size, location, zeroInitialized: false }));
      return { readsZeroes: true };
    },
  };
  return driver as unknown as BlockDriver;
}

/** A format driver as API 1 wrote one: it reads its file through API 1's names. */
function api1Format(): BlockDriver & { asked: string[] } {
  const asked: string[] = [];
  const driver = {
    apiVersion: 1,
    kind: 'format',
    name: 'oldfmt',
    asked,
    probe: (head: Uint8Array) => (head[0] === 0x4f && head[1] === 0x4c ? 100 : 0),
    async open(file: Record<string, unknown> & { size: number }) {
      asked.push(
        `hasBlockStatus=${String(file.hasBlockStatus)}`,
        `readsZeroesInitially=${String(file.readsZeroesInitially)}`,
      );
      const inner = file as unknown as {
        read(o: number, n: number, into?: Uint8Array): Promise<Uint8Array>;
        readSegments?(into: Uint8Array, t: Float64Array, c: number): Promise<void>;
        writeSegments?(offset: number, data: Uint8Array, pairs: Float64Array, count: number): Promise<void>;
      };
      // API 1's pair form of writeSegments still reaches the file.
      const head = new Uint8Array(512);
      head.set([0x4f, 0x4c]);
      await inner.writeSegments!(0, head, Float64Array.of(0, 512), 1);
      const probe = new Uint8Array(1024);
      await inner.readSegments!(probe, Float64Array.of(0, 512, 0, 512, 512, 512), 2);
      asked.push(`head=${probe[0]},${probe[1]}`);
      return { ...file, driverName: 'oldfmt' };
    },
  };
  return driver as unknown as BlockDriver & { asked: string[] };
}

test('an API 1 protocol driver loads, its capabilities and segment lists mapped, and converts in both directions', async () => {
  const images = new Map<string, MemoryBackend>();
  const old = api1Protocol(images);
  const mem = createMemoryDriver();
  const reg = new DriverRegistry().register(old, mem);
  const raw: BlockDriver = {
    apiVersion: 2,
    kind: 'format',
    name: 'raw',
    open: async (file) => file,
    create: async () => {},
    protocolSizeFor: (n) => n,
  };
  reg.register(raw);
  const created = await reg.create('old://a', 256 * KiB, { format: 'raw' });
  assert.ok(created.zeroInitialized, "API 1's readsZeroes from create becomes zeroInitialized");
  assert.ok(created.canZero, 'canWriteZeroes is canZero');
  assert.ok(created.canBlockStatus, 'hasBlockStatus is canBlockStatus');
  assert.type(created.writeSegments, 'function', 'writeScattered is writeSegments');
  const source = new MemoryBackend({ size: 256 * KiB, location: 'mem://src' });
  await source.write(0, pattern(64 * KiB, 3));
  await source.write(128 * KiB, pattern(64 * KiB, 4));
  await convert({ sources: [source], target: created, bufferSize: 256 * KiB });
  assert.ok((await compareImages(source, created)).identical, 'copied into the API 1 backend');
  const back = new MemoryBackend({ size: 256 * KiB, location: 'mem://back', zeroInitialized: false });
  const opened = await reg.open('old://a', { format: 'raw', readOnly: true });
  await convert({ sources: [opened], target: back });
  assert.ok((await compareImages(source, back)).identical, 'and out of it');
});

test('an API 1 format driver sees its file with API 1 names and lists', async () => {
  const images = new Map<string, MemoryBackend>();
  const fmt = api1Format();
  const reg = new DriverRegistry().register(api1Protocol(images), fmt);
  images.set('old://f', new MemoryBackend({ size: 64 * KiB, location: 'old://f' }));
  images.get('old://f')!.write(0, Uint8Array.of(0x4f, 0x4c));
  const img = await reg.open('old://f');
  assert.is(img.driverName, 'oldfmt');
  assert.ok(fmt.asked.includes('hasBlockStatus=true'), fmt.asked.join(' '));
  assert.ok(fmt.asked.includes('head=79,76'), 'read through API 1 readSegments');
  assert.ok(img.canBlockStatus, 'its backend, API 2 again');
  await img.close();
});

test.run();
