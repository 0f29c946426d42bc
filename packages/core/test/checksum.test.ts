// blkhash digests of in-memory images against the test vectors of blkhash itself
// (nirs/blkhash test/blkhash-test.c, sha256, 64 KiB blocks): "-" is a hole (zero by
// block status, never read), "\0" zeroes written as data, a letter a run of that byte.
import { createHash } from 'node:crypto';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BlockHash, MemoryBackend, checksumImage } from '../src/index.js';

const B = 64 * 1024;

async function imageOf(extents: Array<[string, number]>): Promise<MemoryBackend> {
  const size = extents.reduce((n, [, len]) => n + len, 0);
  const mem = new MemoryBackend({ size: Math.max(size, 1), limits: { requestAlignment: 1 } });
  let pos = 0;
  for (const [byte, len] of extents) {
    if (byte !== '-') await mem.write(pos, new Uint8Array(len).fill(byte.charCodeAt(0)));
    pos += len;
  }
  return size === 0 ? new MemoryBackend({ size: 0 } as never) : mem;
}

const VECTORS: Array<[string, Array<[string, number]>, string]> = [
  ['one data block', [['A', B]], '2e3a5f57d5e726ee5de62db1a85ff816f4fa6ea4627807d9a51bdc4c883e165e'],
  ['a block of written zeroes', [['\0', B]], '8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af'],
  ['a hole of one block', [['-', B]], '8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af'],
  ['half a block of data', [['A', B / 2]], '9467334d6d7668a2f06898185b5cddc78cdfbd962f50c6bf250101f03a0e54dc'],
  ['half a block of zeroes', [['\0', B / 2]], '842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56'],
  ['half a block of hole', [['-', B / 2]], '842d185f0ff348b0d689e184bddc47f69a19032a6934c89b879479f1e86f9d56'],
  ['8 blocks of hole', [['-', 8 * B]], '722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d'],
  ['1 GiB of hole', [['-', 1 << 30]], 'c6d6562c3074a2caa0ceea3e1f460f3af678c792ed05e64157eb51e68ae5260d'],
  ['8.5 blocks of hole', [['-', 8 * B + B / 2]], 'e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c'],
  ['8 blocks of zeroes', [['\0', 8 * B]], '722ac11a3a81034edf196aa3ee68d1a2e345cd0838b0c78c2ce2fb015d4d817d'],
  [
    '8.5 blocks of zeroes',
    [
      ['\0', 8 * B],
      ['\0', B / 2],
    ],
    'e623a5702b1feb08fbb3d18e35bbb7ec10146b8cd1bcff811200a3948c78c55c',
  ],
  [
    'half blocks A to F',
    [...'ABCDEF'].map((c) => [c, B / 2] as [string, number]),
    '4ab1586084326f5beb911621282e9557cd26856105eff7f78cace5986af4738b',
  ],
  [
    'half blocks A to E',
    [...'ABCDE'].map((c) => [c, B / 2] as [string, number]),
    '2cad558b3a2a8d87435e80fe7bae69fa664d92eaa1b9411f573b9fbb412a4d43',
  ],
  [
    'data, holes and zeroes mixed within blocks',
    [
      ['A', B / 2],
      ['-', B / 2],
      ['-', B / 2],
      ['\0', B / 2],
      ['E', B / 2],
      ['-', B / 2],
      ['-', B / 2],
      ['\0', B / 2],
    ],
    '4b2b5acd96f8105f4fb26abaf35c7c5756338ef9ccce19ffe7714c9ad94b4398',
  ],
];

for (const [name, extents, want] of VECTORS) {
  test(`blkhash test vector: ${name}`, async () => {
    const img = await imageOf(extents);
    const r = await checksumImage(img, { bufferSize: 4 * B, threads: 2 });
    assert.is(r.checksum, want);
    assert.is(r.algorithm, 'blkhash-sha256');
  });
}

test('holes are hashed without being read: 1 GiB of hole reads nothing', async () => {
  const img = await imageOf([['-', 1 << 30]]);
  const r = await checksumImage(img);
  assert.is(r.bytesRead, 0);
});

test('a flipped byte anywhere changes the digest; the digest does not depend on buffer size or threads', async () => {
  const size = 3 * B + 1234;
  const mem = new MemoryBackend({ size, limits: { requestAlignment: 1 } });
  const data = new Uint8Array(size).map((_, i) => (i * 31) & 0xff);
  await mem.write(0, data);
  const base = (await checksumImage(mem, { bufferSize: B, threads: 1 })).checksum;
  assert.is((await checksumImage(mem, { bufferSize: 8 * B, threads: 3, inFlight: 7 })).checksum, base);
  for (const at of [0, B - 1, B, 2 * B + 17, size - 1]) {
    await mem.write(at, Uint8Array.of(data[at]! ^ 1));
    assert.is.not((await checksumImage(mem)).checksum, base, `flip at ${at}`);
    await mem.write(at, Uint8Array.of(data[at]!));
  }
});

test('an empty image: SHA-256 of the length alone', async () => {
  const h = await BlockHash.create();
  assert.is(h.hexdigest(), createHash('sha256').update(Buffer.alloc(8)).digest('hex'));
});

test('a read error names the offset, and nothing is left running', async () => {
  const mem = new MemoryBackend({
    size: 16 * B,
    fail: (op, offset) => (op === 'read' && offset >= 8 * B ? new Error('boom') : undefined),
  });
  await mem.write(0, new Uint8Array(16 * B).fill(1));
  const err = await checksumImage(mem, { bufferSize: 2 * B }).catch((e: unknown) => e as Error);
  assert.match(String(err), /read at offset 524288/);
});

test('convert --checksum: the digest of what was copied equals checksumImage of the source, however it is copied', async () => {
  const { convert } = await import('../src/index.js');
  const size = 40 * B + 777;
  const src = new MemoryBackend({ size, limits: { requestAlignment: 1 } });
  const data = new Uint8Array(size).map((_, i) => ((i * 13) ^ (i >> 9)) & 0xff);
  await src.write(0, data.subarray(0, 10 * B));
  await src.write(10 * B, new Uint8Array(3 * B)); // written zeroes
  await src.write(20 * B + 100, data.subarray(20 * B + 100, 30 * B)); // data not on a block boundary
  await src.write(size - 500, data.subarray(size - 500)); // the odd tail
  const want = (await checksumImage(src)).checksum;
  for (const o of [
    {},
    { workers: 1 },
    { workers: 7, outOfOrder: true },
    { minSparse: 0 },
    { bufferSize: 3 * B },
    { workers: 'auto' as const },
  ]) {
    const target = new MemoryBackend({ size, limits: { requestAlignment: 512 } });
    const r = await convert({ sources: [src], target, checksum: true, ...o });
    assert.is(r.checksum, want, JSON.stringify(o));
    assert.is((await checksumImage(target)).checksum, want, `target content, ${JSON.stringify(o)}`);
  }
  const plain = await convert({ sources: [src], target: new MemoryBackend({ size }) });
  assert.is(plain.checksum, undefined, 'no checksum unless asked');
});

test('convert --checksum of concatenated sources equals the checksum of the whole; unaligned joins are refused', async () => {
  const { convert } = await import('../src/index.js');
  const a = new MemoryBackend({ size: 4 * B });
  const b = new MemoryBackend({ size: 3 * B + 5 });
  await a.write(B, new Uint8Array(B).fill(7));
  await b.write(0, new Uint8Array(3 * B + 5).fill(9));
  const whole = new MemoryBackend({ size: 7 * B + 5 });
  await convert({ sources: [a, b], target: whole });
  const r = await convert({ sources: [a, b], target: new MemoryBackend({ size: 7 * B + 5 }), checksum: true });
  assert.is(r.checksum, (await checksumImage(whole)).checksum);
  const odd = new MemoryBackend({ size: B + 512 });
  const err = await convert({ sources: [odd, b], target: new MemoryBackend({ size: 8 * B }), checksum: true }).catch(
    (e: unknown) => e as Error,
  );
  assert.match(String(err), /not on a 64 KiB block/);
});

test('convert --verify: reads the target back; a target that stores other bytes fails loudly', async () => {
  const { convert } = await import('../src/index.js');
  const src = new MemoryBackend({ size: 8 * B });
  await src.write(0, new Uint8Array(8 * B).fill(3));
  const good = await convert({ sources: [src], target: new MemoryBackend({ size: 9 * B }), verify: true });
  assert.ok(good.verified);
  assert.is(good.checksum, (await checksumImage(src)).checksum);
  const bad = new MemoryBackend({ size: 8 * B });
  const store = bad.write.bind(bad);
  bad.write = (offset: number, d: Uint8Array) => {
    const c = d.slice();
    if (offset === 0) c[5] = 0xff;
    return store(offset, c);
  };
  const err = await convert({ sources: [src], target: bad, verify: true }).catch((e: unknown) => e as Error);
  assert.match(
    String(err),
    /verify failed: the target reads back as blkhash [0-9a-f]{64}, the copied data was [0-9a-f]{64}/,
  );
});

test.run();
