/**
 * Compressed clusters through both decompression paths: the native codec
 * (@blockconv/codec) and the fallback (node:zlib, WebAssembly libzstd) that
 * BLOCKCONV_NATIVE_CODEC=0 forces, as on a machine without the -dev libraries.
 * Every other test file reads with the native codec when it is built.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DriverRegistry, type ProtocolDriver, type SegmentList } from '@blockconv/core';
import { drivers as rawDrivers, fileDriver } from '@blockconv/driver-raw';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { usesNativeCodec } from '../src/compression.js';
import { drivers as qcow2Drivers } from '../src/index.js';
import {
  KiB,
  MiB,
  blockError,
  create,
  findL2Entry,
  libConvert,
  patch,
  qemuConvert,
  qemuImg,
  qemuIo,
  readAll,
  registry,
  removeDir,
  tempDir,
} from './helpers.js';

const native = await import('@blockconv/codec').then(
  (m) => m.available,
  () => false,
);

let dir = '';
let n = 0;

/** Random hex digits: they shrink to ~60 %, so every cluster is stored compressed with a long stream. */
function hex(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  let x = seed;
  for (let i = 0; i < length; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    out[i] = '0123456789abcdef'.charCodeAt(x >>> 28);
  }
  return out;
}

/** A compressed 4 MiB image (qemu-img convert -c) with data, holes and odd-sized runs, and its raw conversion by qemu-img. */
function compressedImage(type: 'zlib' | 'zstd', cluster = 64 * KiB): { image: string; ref: string } {
  const src = path.join(dir, `src${n++}.raw`);
  const data = Buffer.alloc(4 * MiB);
  hex(MiB, 1).copy(data, 0);
  hex(700 * KiB, 2).copy(data, 1536 * KiB);
  hex(64 * KiB, 3).copy(data, 3 * MiB);
  fs.writeFileSync(src, data);
  const image = path.join(dir, `c${n++}.qcow2`);
  qemuImg(
    'convert',
    '-q',
    '-c',
    '-f',
    'raw',
    '-O',
    'qcow2',
    '-o',
    `compression_type=${type},cluster_size=${cluster}`,
    src,
    image,
  );
  const ref = path.join(dir, `ref${n++}.raw`);
  qemuConvert(image, ref);
  return { image, ref };
}

function paths(name: string, forceFallback: boolean): void {
  const test = suite(name);
  const saved = process.env.BLOCKCONV_NATIVE_CODEC;
  test.before(() => {
    dir = tempDir('blockconv-qcow2-codec-');
    if (forceFallback) process.env.BLOCKCONV_NATIVE_CODEC = '0';
  });
  test.after(() => {
    if (saved === undefined) delete process.env.BLOCKCONV_NATIVE_CODEC;
    else process.env.BLOCKCONV_NATIVE_CODEC = saved;
    removeDir(dir);
  });

  test('the expected path is in use', async () => {
    assert.is(await usesNativeCodec(), !forceFallback && native);
  });

  for (const type of ['zlib', 'zstd'] as const) {
    for (const cluster of [512, 64 * KiB, 2 * MiB]) {
      test(`${type}, ${cluster}-byte clusters: same bytes as qemu-img, whole and at odd offsets`, async () => {
        const { image, ref } = compressedImage(type, cluster);
        const out = path.join(dir, `out${n++}.raw`);
        await libConvert(image, out);
        assert.ok(fs.readFileSync(out).equals(fs.readFileSync(ref)), 'converted whole');
        // Reads that start and end inside compressed clusters.
        const img = await registry().open(image, { readOnly: true, format: 'qcow2' });
        try {
          const want = fs.readFileSync(ref);
          for (const [at, len] of [
            [1000, 5000],
            [cluster - 7, 3 * cluster + 14],
            [MiB - 512, 2048],
          ] as const) {
            if (at + len > img.size) continue;
            const got = await img.read(at, len);
            assert.ok(Buffer.from(got).equals(want.subarray(at, at + len)), `read(${at}, ${len})`);
          }
        } finally {
          await img.close();
        }
      });
    }

    test(`${type}: a corrupt cluster is ECORRUPT naming its guest offset`, async () => {
      const { image } = compressedImage(type);
      // The second compressed cluster: damage its stream, keep the first intact.
      let seen = 0;
      const { entry } = findL2Entry(image, (e) => (e & (1n << 62n)) !== 0n && seen++ === 1);
      const host = Number(entry & ((1n << 54n) - 1n));
      patch(
        image,
        host,
        Array.from({ length: 64 }, (_, i) => (i * 53 + 7) & 0xff),
      );
      const err = await blockError(readAll(image));
      assert.is(err.code, 'ECORRUPT', err.message);
      assert.is(err.field, 'compressed cluster');
      assert.is(err.offset, host);
      assert.match(err.message, new RegExp(`compressed cluster at guest offset 65536: ${type}: `));
    });

    test(`${type}: a cluster whose stream is cut short is ECORRUPT`, async () => {
      const { image } = compressedImage(type);
      const { entry } = findL2Entry(image, (e) => (e & (1n << 62n)) !== 0n);
      const host = Number(entry & ((1n << 54n) - 1n));
      // Sector count 1: the descriptor now covers only 512 bytes of a longer stream.
      const { at } = findL2Entry(image, (e) => e === entry);
      const shrunk = entry & ~(0xffn << 54n); // 64 KiB clusters: sector count - 1 in bits 54..61
      const bytes = Buffer.alloc(8);
      bytes.writeBigUInt64BE(shrunk);
      patch(image, at, [...bytes]);
      const err = await blockError(readAll(image));
      assert.is(err.code, 'ECORRUPT', err.message);
      assert.is(err.offset, host);
      assert.match(err.message, /compressed cluster at guest offset 0: (zlib|zstd): .*(truncated|decompresses to)/);
    });

    test(`${type}: compressed clusters scattered in the file come in one vectored read per request`, async () => {
      // Written last to first, the clusters lie in the file in reverse order: no two
      // neighbours in the guest are neighbours in the file (as qemu-img convert -c -m N leaves them).
      const image = create(path.join(dir, `rev${n++}.qcow2`), 4 * MiB, { compression_type: type });
      const writes: string[] = [];
      for (let c = 31; c >= 0; c--) writes.push(`write -c -P ${0x20 + c} ${c * 64 * KiB} 64k`);
      qemuIo(image, writes);
      const ref = path.join(dir, `rev-ref${n++}.raw`);
      qemuConvert(image, ref);
      const calls = { read: 0, readSegments: 0 };
      const countingFile: ProtocolDriver = {
        ...fileDriver,
        async open(location, options) {
          const b = await fileDriver.open(location, options);
          const read = b.read.bind(b);
          const readSegments = b.readSegments!.bind(b);
          return Object.assign(b, {
            read: (o: number, l: number, into?: Uint8Array) => {
              calls.read++;
              return read(o, l, into);
            },
            readSegments: (into: Uint8Array, segs: SegmentList) => {
              calls.readSegments++;
              return readSegments(into, segs);
            },
          });
        },
      };
      const reg = new DriverRegistry().register(...rawDrivers, ...qcow2Drivers, countingFile);
      const img = await reg.open(image, { readOnly: true });
      try {
        await img.read(0, 64 * KiB); // loads the L2 table
        const before = { ...calls };
        const got = await img.read(0, 2 * MiB, new Uint8Array(2 * MiB));
        assert.ok(Buffer.from(got).equals(fs.readFileSync(ref).subarray(0, 2 * MiB)));
        assert.is(calls.readSegments - before.readSegments, 1, 'one vectored read for 32 scattered clusters');
        assert.is(calls.read - before.read, 0);
      } finally {
        await img.close();
      }
    });
  }

  test.run();
}

paths('compressed clusters, native codec (when built)', false);
paths('compressed clusters, fallback codecs (BLOCKCONV_NATIVE_CODEC=0)', true);
