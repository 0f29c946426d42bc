/** The native cluster codec: round trips, QEMU's exact output, corrupt input, batch splitting. */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { constants as zc, deflateRawSync, deflateSync, inflateRawSync } from 'node:zlib';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  STORE_UNCOMPRESSED,
  available,
  compressBatch,
  decompressBatch,
  versions,
  type CodecError,
  type CodecKind,
} from '../src/index.js';

const KiB = 1024;
const KINDS: CodecKind[] = ['zlib', 'zstd'];

/** Compressible clusters: random hex digits (about 60 % after compression), seeded by `seed`. */
function hexClusters(count: number, size: number, seed = 1): Uint8Array {
  const out = new Uint8Array(count * size);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < out.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = '0123456789abcdef'.charCodeAt(x & 15);
  }
  return out;
}

/** Compresses `count` clusters laid end to end; slots of size - 1 bytes end to end. */
async function compress(
  kind: CodecKind,
  data: Uint8Array,
  size: number,
  jobs?: number,
): Promise<{ out: Uint8Array; lengths: Int32Array }> {
  const count = data.length / size;
  const spans = new Float64Array(2 * count);
  for (let i = 0; i < count; i++) {
    spans[2 * i] = i * size;
    spans[2 * i + 1] = i * (size - 1);
  }
  const out = new Uint8Array(count * (size - 1));
  const lengths = await compressBatch({
    kind,
    clusterSize: size,
    input: data,
    spans,
    output: out,
    lengths: new Int32Array(count),
    jobs,
  });
  return { out, lengths };
}

/** Decompresses streams (each possibly with trailing bytes) into clusters end to end. */
async function decompress(kind: CodecKind, streams: Uint8Array[], size: number, jobs?: number): Promise<Uint8Array> {
  const input = new Uint8Array(streams.reduce((n, s) => n + s.length, 0));
  const spans = new Float64Array(3 * streams.length);
  let at = 0;
  streams.forEach((s, i) => {
    input.set(s, at);
    spans.set([at, s.length, i * size], 3 * i);
    at += s.length;
  });
  const output = new Uint8Array(streams.length * size);
  await decompressBatch({ kind, clusterSize: size, input, spans, output, jobs });
  return output;
}

function streamsOf(c: { out: Uint8Array; lengths: Int32Array }, size: number): Uint8Array[] {
  return [...c.lengths].map((n, i) => c.out.subarray(i * (size - 1), i * (size - 1) + n));
}

async function failure(p: Promise<unknown>): Promise<CodecError> {
  try {
    await p;
  } catch (err) {
    return err as CodecError;
  }
  throw new Error('expected a rejection');
}

test('the addon is built and reports its libraries', () => {
  assert.ok(available, 'addon loaded');
  assert.match(versions!.libdeflate, /^1\./);
  assert.match(versions!.zstd, /^1\.5/);
  assert.match(versions!.zlib, /^1\.2/, 'the system zlib, linked in, not the one Node exports');
});

for (const kind of KINDS) {
  test(`${kind}: round trip at every cluster size, one job and several`, async () => {
    for (const size of [512, 4 * KiB, 64 * KiB, 2048 * KiB]) {
      const count = size >= 2048 * KiB ? 3 : 24;
      const data = hexClusters(count, size, size);
      for (const jobs of [1, 4]) {
        const c = await compress(kind, data, size, jobs);
        for (const n of c.lengths) assert.ok(n > 0 && n < size, `${kind} ${size}: ${n} bytes`);
        const back = await decompress(kind, streamsOf(c, size), size, jobs);
        assert.ok(Buffer.from(back).equals(Buffer.from(data)), `${kind} ${size} jobs=${jobs}: same bytes`);
      }
    }
  });

  test(`${kind}: a cluster that does not shrink is to be stored uncompressed`, async () => {
    const size = 64 * KiB;
    const data = new Uint8Array(3 * size);
    data.set(randomBytes(size), size); // the middle one is incompressible
    const c = await compress(kind, data, size);
    assert.ok(c.lengths[0]! > 0 && c.lengths[0]! < 100, 'zeroes shrink');
    assert.is(c.lengths[1], STORE_UNCOMPRESSED);
    assert.ok(c.lengths[2]! > 0 && c.lengths[2]! < 100);
  });

  test(`${kind}: trailing bytes after the stream are ignored`, async () => {
    const size = 64 * KiB;
    const data = hexClusters(2, size, 7);
    const streams = streamsOf(await compress(kind, data, size), size).map((s) => Buffer.concat([s, randomBytes(511)]));
    assert.ok(Buffer.from(await decompress(kind, streams, size)).equals(Buffer.from(data)));
  });

  test(`${kind}: corrupt clusters reject with ECORRUPT and the first failing index`, async () => {
    const size = 64 * KiB;
    const data = hexClusters(16, size, 3);
    const good = streamsOf(await compress(kind, data, size), size);
    const cases: Array<[string, Uint8Array, RegExp]> = [
      [
        'truncated',
        good[0]!.subarray(0, good[0]!.length >> 1),
        kind === 'zlib' ? /truncated|decompresses to \d+ bytes, expected 65536/ : /truncated/,
      ],
      ['garbage', new Uint8Array(randomBytes(4096)), kind === 'zlib' ? /./ : /not a zstd frame/],
      ['empty', new Uint8Array(0), /./],
    ];
    for (const [name, bad, why] of cases) {
      for (const jobs of [1, 4]) {
        const streams = good.slice();
        streams[11] = bad;
        const err = await failure(decompress(kind, streams, size, jobs));
        assert.is(err.code, 'ECORRUPT', `${name}: code`);
        assert.is(err.index, 11, `${name} jobs=${jobs}: index`);
        assert.match(err.reason, why, `${name}: ${err.reason}`);
        assert.match(err.message, /^cluster 11: /);
      }
    }
    const streams = good.slice();
    streams[5] = new Uint8Array(16);
    streams[11] = new Uint8Array(16);
    assert.is((await failure(decompress(kind, streams, size, 4))).index, 5, 'the lowest failing index wins');
  });

  test(`${kind}: output longer or shorter than a cluster is refused`, async () => {
    const size = 64 * KiB;
    const long = streamsOf(await compress(kind, hexClusters(1, 2 * size, 4), 2 * size), 2 * size)[0]!;
    const short = streamsOf(await compress(kind, hexClusters(1, size / 2, 5), size / 2), size / 2)[0]!;
    const l = await failure(decompress(kind, [long], size));
    assert.is(l.code, 'ECORRUPT');
    assert.match(
      l.reason,
      kind === 'zlib' ? /more than 65536 bytes/ : /content size 131072 is not the cluster size 65536/,
    );
    const s = await failure(decompress(kind, [short], size));
    assert.match(
      s.reason,
      kind === 'zlib'
        ? /decompresses to 32768 bytes, expected 65536/
        : /content size 32768 is not the cluster size 65536/,
    );
  });

  test(`${kind}: many batches at once`, async () => {
    const size = 64 * KiB;
    const data = hexClusters(32, size, 9);
    const streams = streamsOf(await compress(kind, data, size), size);
    const outs = await Promise.all(Array.from({ length: 8 }, () => decompress(kind, streams, size)));
    for (const o of outs) assert.ok(Buffer.from(o).equals(Buffer.from(data)));
  });
}

test('zlib: output inflates with a 4 KiB window, as QEMU reads it', async () => {
  const size = 64 * KiB;
  const data = hexClusters(4, size, 11);
  const c = await compress('zlib', data, size);
  streamsOf(c, size).forEach((s, i) => {
    const back = inflateRawSync(s, { windowBits: 12 });
    assert.ok(back.equals(Buffer.from(data.subarray(i * size, (i + 1) * size))), `cluster ${i}`);
  });
});

test('zlib: a stream that fills the cluster without a final block is read as QEMU (zlib, Z_FINISH) reads it', async () => {
  const size = 64 * KiB;
  const data = hexClusters(1, size, 12);
  const open = deflateRawSync(data, { finishFlush: zc.Z_SYNC_FLUSH });
  // Ending where the descriptor ends: accepted (libdeflate refuses it; zlib decides).
  assert.ok(Buffer.from(await decompress('zlib', [open], size)).equals(Buffer.from(data)));
  // Zero padding after it parses as a stored block with bad lengths: zlib, so QEMU, refuses it.
  const padded = Buffer.concat([open, Buffer.alloc(512 - (open.length % 512))]);
  assert.match((await failure(decompress('zlib', [padded], size))).reason, /invalid stored block lengths/);
  // Without the last bytes of data it is short.
  const short = deflateRawSync(data.subarray(0, size - 100), { finishFlush: zc.Z_SYNC_FLUSH });
  assert.match(
    (await failure(decompress('zlib', [short], size))).reason,
    /truncated stream: decompresses to 65436 bytes/,
  );
});

test('zstd: hostile frame headers are refused', async () => {
  const size = 64 * KiB;
  const [frame] = streamsOf(await compress('zstd', hexClusters(1, size, 13), size), size);
  const withDict = Buffer.from(frame!);
  // Frame header descriptor: dictionary ID flag 1 (one byte) would shift the header; a
  // skippable frame and a bad magic are simpler hostile inputs.
  withDict[0] = 0x50;
  withDict[1] = 0x2a;
  withDict[2] = 0x4d;
  withDict[3] = 0x18; // skippable magic
  assert.match((await failure(decompress('zstd', [withDict], size))).reason, /content size 0|not a zstd frame/);
  const dict = Buffer.concat([frame!.subarray(0, 4), Buffer.from([frame![4]! | 0x01, 0x07]), frame!.subarray(5)]);
  assert.match((await failure(decompress('zstd', [dict], size))).reason, /dictionary/);
  assert.match((await failure(decompress('zstd', [frame!.subarray(0, 5)], size))).reason, /not a zstd frame|truncated/);
});

test('compressed clusters are byte for byte what qemu-img writes', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockconv-codec-'));
  try {
    const size = 64 * KiB;
    const data = hexClusters(1, size, 21);
    const raw = path.join(dir, 'one.raw');
    fs.writeFileSync(raw, data);
    for (const kind of KINDS) {
      const img = path.join(dir, `${kind}.qcow2`);
      execFileSync('qemu-img', [
        'convert',
        '-q',
        '-c',
        '-f',
        'raw',
        '-O',
        'qcow2',
        '-o',
        `cluster_size=${size},compression_type=${kind}`,
        raw,
        img,
      ]);
      const file = fs.readFileSync(img);
      const l2 = Number(file.readBigUInt64BE(Number(file.readBigUInt64BE(40))) & 0x00fffffffffffe00n);
      const entry = file.readBigUInt64BE(l2);
      assert.ok(entry & (1n << 62n), `${kind}: the cluster is compressed`);
      const host = Number(entry & ((1n << 54n) - 1n)); // 62 - (cluster_bits - 8) offset bits
      const c = await compress(kind, data, size);
      const ours = streamsOf(c, size)[0]!;
      assert.ok(
        Buffer.from(ours).equals(file.subarray(host, host + ours.length)),
        `${kind}: same ${ours.length} bytes as qemu-img`,
      );
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('bad arguments reject before anything runs', async () => {
  const out = new Uint8Array(64 * KiB);
  const e1 = await failure(
    decompressBatch({
      kind: 'zlib',
      clusterSize: 64 * KiB,
      input: new Uint8Array(10),
      spans: Float64Array.of(0, 11, 0),
      output: out,
    }),
  );
  assert.instance(e1, RangeError);
  const e2 = await failure(
    decompressBatch({
      kind: 'zlib',
      clusterSize: 64 * KiB,
      input: new Uint8Array(10),
      spans: Float64Array.of(0, 10, 1),
      output: out,
    }),
  );
  assert.instance(e2, RangeError, 'output slot past the end');
  const e3 = await failure(
    decompressBatch({
      kind: 'lz4' as CodecKind,
      clusterSize: 64 * KiB,
      input: new Uint8Array(10),
      spans: Float64Array.of(0, 10, 0),
      output: out,
    }),
  );
  assert.instance(e3, TypeError);
  const e4 = await failure(
    decompressBatch({
      kind: 'zstd',
      clusterSize: 1000,
      input: new Uint8Array(10),
      spans: Float64Array.of(0, 10, 0),
      output: out,
    }),
  );
  assert.instance(e4, RangeError, 'cluster size not a power of two');
  const e5 = await failure(
    compressBatch({
      kind: 'zlib',
      clusterSize: 64 * KiB,
      input: out,
      spans: Float64Array.of(0, 2),
      output: out.subarray(0, 64 * KiB),
      lengths: new Int32Array(1),
    }),
  );
  assert.instance(e5, RangeError, 'compress slot past the end');
  await decompressBatch({
    kind: 'zlib',
    clusterSize: 64 * KiB,
    input: new Uint8Array(0),
    spans: new Float64Array(0),
    output: out,
  });
});

// rfc1950: zlib streams (header, deflate, adler32) of at most a cluster, as a VMDK
// streamOptimized grain is; node:zlib's deflateSync writes them.

/** Decompresses rfc1950 streams into slots of `size` bytes end to end; the lengths reported. */
async function inflateStreams(
  streams: Uint8Array[],
  size: number,
  jobs?: number,
): Promise<{ output: Uint8Array; lengths: Int32Array }> {
  const input = Buffer.concat(streams);
  const spans = new Float64Array(3 * streams.length);
  let at = 0;
  streams.forEach((s, i) => {
    spans.set([at, s.length, i * size], 3 * i);
    at += s.length;
  });
  const output = new Uint8Array(streams.length * size);
  const lengths = new Int32Array(streams.length).fill(-7);
  await decompressBatch({ kind: 'rfc1950', clusterSize: size, input, spans, output, lengths, jobs });
  return { output, lengths };
}

test('rfc1950: grains of every cluster size decompress, lengths reported, one job and several', async () => {
  for (const size of [512, 4 * KiB, 64 * KiB, 2048 * KiB]) {
    const count = size >= 2048 * KiB ? 3 : 24;
    const data = hexClusters(count, size, size + 1);
    const streams = Array.from({ length: count }, (_, i) => deflateSync(data.subarray(i * size, (i + 1) * size)));
    for (const jobs of [1, 4]) {
      const { output, lengths } = await inflateStreams(streams, size, jobs);
      assert.equal([...lengths], Array(count).fill(size), `${size} jobs=${jobs}: lengths`);
      assert.ok(Buffer.from(output).equals(Buffer.from(data)), `${size} jobs=${jobs}: same bytes`);
    }
  }
});

test('rfc1950: a short last grain, an empty one and trailing bytes', async () => {
  const size = 64 * KiB;
  const data = hexClusters(3, size, 21);
  const last = data.subarray(2 * size, 2 * size + 1000);
  const streams = [
    Buffer.concat([deflateSync(data.subarray(0, size)), new Uint8Array(randomBytes(511))]), // padded to a sector, as in a VMDK
    deflateSync(data.subarray(size, 2 * size), { level: 0 }), // stored blocks
    deflateSync(new Uint8Array(0)),
    deflateSync(last),
  ];
  const { output, lengths } = await inflateStreams(streams, size, 4);
  assert.equal([...lengths], [size, size, 0, 1000]);
  assert.ok(Buffer.from(output.subarray(0, 2 * size)).equals(Buffer.from(data.subarray(0, 2 * size))));
  assert.ok(Buffer.from(output.subarray(3 * size, 3 * size + 1000)).equals(Buffer.from(last)));
  // Other window sizes (CINFO) and levels are all zlib streams.
  const small = deflateSync(data.subarray(0, size), { windowBits: 9, level: 9 });
  assert.equal([...(await inflateStreams([small], size)).lengths], [size]);
});

test('rfc1950: corrupt adler32, truncated input, output past the slot, wrong header: ECORRUPT naming the grain', async () => {
  const size = 64 * KiB;
  const data = hexClusters(8, size, 22);
  const good: Uint8Array[] = Array.from({ length: 8 }, (_, i) => deflateSync(data.subarray(i * size, (i + 1) * size)));
  const badAdler = Buffer.from(good[5]!);
  badAdler[badAdler.length - 1]! ^= 0x01;
  const dict = deflateSync(data.subarray(0, 4096), { dictionary: Buffer.from('a preset dictionary') });
  const cases: Array<[string, Uint8Array, RegExp]> = [
    ['corrupt adler32', badAdler, /^incorrect data check: the adler32 does not match the data$/],
    [
      'truncated in the data',
      good[5]!.subarray(0, good[5]!.length >> 1),
      /^truncated stream: the input ends after \d+ bytes of output$/,
    ],
    [
      'truncated in the adler32',
      good[5]!.subarray(0, good[5]!.length - 2),
      /^truncated stream: the input ends after 65536 bytes of output$/,
    ],
    ['empty', new Uint8Array(0), /^truncated stream: the input ends after 0 bytes of output$/],
    ['output larger than the slot', deflateSync(data.subarray(0, size + 1)), /^decompresses to more than 65536 bytes$/],
    ['raw deflate, no zlib header', deflateRawSync(data.subarray(0, size)), /incorrect header check|invalid/],
    ['garbage', new Uint8Array(randomBytes(4096)), /./],
    ['a preset dictionary', dict, /needs a preset dictionary/],
  ];
  for (const [name, bad, why] of cases) {
    for (const jobs of [1, 4]) {
      const streams = good.slice();
      streams[5] = bad;
      const err = await failure(inflateStreams(streams, size, jobs));
      assert.is(err.code, 'ECORRUPT', `${name}: code`);
      assert.is(err.index, 5, `${name} jobs=${jobs}: index`);
      assert.match(err.reason, why, `${name}: ${err.reason}`);
      assert.match(err.message, /^cluster 5: /);
    }
  }
  // Exactly a slot's worth, its trailer checked after the output is full.
  const exact = Buffer.from(good[0]!);
  assert.equal([...(await inflateStreams([exact], size)).lengths], [size]);
  exact[exact.length - 2]! ^= 0x10;
  assert.match((await failure(inflateStreams([exact], size))).reason, /incorrect data check/);
});

test('rfc1950: lengths are required, compressing is refused, other kinds report a whole cluster', async () => {
  const size = 4 * KiB;
  const stream = deflateSync(hexClusters(1, size, 23));
  const spans = Float64Array.of(0, stream.length, 0);
  const output = new Uint8Array(size);
  assert.instance(
    await failure(decompressBatch({ kind: 'rfc1950', clusterSize: size, input: stream, spans, output })),
    TypeError,
  );
  const short = await failure(
    decompressBatch({
      kind: 'rfc1950',
      clusterSize: size,
      input: stream,
      spans: Float64Array.of(0, stream.length, 0, 0, 1, 0),
      output: new Uint8Array(2 * size),
      lengths: new Int32Array(1),
    }),
  );
  assert.instance(short, RangeError, 'lengths shorter than the batch');
  const c = await failure(
    compressBatch({
      kind: 'rfc1950',
      clusterSize: size,
      input: output,
      spans: Float64Array.of(0, 0),
      output,
      lengths: new Int32Array(1),
    }),
  );
  assert.instance(c, TypeError);
  const z = await compress('zstd', hexClusters(2, size, 24), size);
  const lengths = new Int32Array(2);
  const zs = streamsOf(z, size);
  await decompressBatch({
    kind: 'zstd',
    clusterSize: size,
    input: Buffer.concat(zs),
    spans: Float64Array.of(0, zs[0]!.length, 0, zs[0]!.length, zs[1]!.length, size),
    output: new Uint8Array(2 * size),
    lengths,
  });
  assert.equal([...lengths], [size, size]);
});

test.run();
