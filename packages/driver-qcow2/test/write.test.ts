/**
 * The write side: images blockconv creates and writes must pass `qemu-img check`
 * with no errors and no leaks, read back (through qemu-img and qemu-io) exactly as
 * written, for every -o option; random concurrent writes, zero writes and discards
 * at odd offsets agree with a plain byte mirror; and the conformance kit passes.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { BlockError, type BlockBackend } from '@blockconv/core';
import { conformance } from '@blockconv/core/testkit';
import {
  KiB,
  MiB,
  cliAsync,
  create,
  headerOf,
  patch,
  qemuImg,
  qemuIo,
  registry,
  removeDir,
  tempDir,
} from './helpers.js';

const dir = tempDir('blockconv-qcow2-write-');
process.on('exit', () => removeDir(dir));

/** qemu-img check's verdict as JSON (exit 0 clean, 2 corruptions, 3 leaks only). */
function check(image: string): { corruptions: number; leaks: number; checkErrors: number; raw: string } {
  let out: string;
  try {
    out = qemuImg('check', '--output=json', image);
  } catch (err) {
    out = String((err as { stdout?: string }).stdout ?? '');
    if (!out.trim()) throw err;
  }
  const j = JSON.parse(out) as { corruptions?: number; leaks?: number; 'check-errors'?: number };
  return { corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, checkErrors: j['check-errors'] ?? 0, raw: out };
}

function assertClean(image: string): void {
  const c = check(image);
  assert.is(c.corruptions + c.leaks + c.checkErrors, 0, `qemu-img check ${image}: ${c.raw}`);
}

function assertSame(a: string, b: string): void {
  try {
    qemuImg('compare', a, b);
  } catch (err) {
    assert.unreachable(`qemu-img compare ${a} ${b}: ${String((err as { stdout?: string }).stdout ?? err)}`);
  }
}

// A 24 MiB source with data in odd places, zero runs and holes.
const source = path.join(dir, 'source.raw');
fs.writeFileSync(source, '');
fs.truncateSync(source, 24 * MiB);
qemuIo(
  source,
  [
    'write -P 0x11 0 3M',
    'write -P 0x22 3200k 4k',
    'write -P 0x33 5M 1536',
    'write -P 0x44 9999872 70000',
    'write -P 0x55 12M 9M',
    'write -z 14M 64k',
    'write -P 0x66 24572k 4k',
  ],
  ['-f', 'raw'],
);

const convertTo = suite('convert -O qcow2 -o ...: qemu-img check clean, identical to the source');
const variants: Array<[string, string[]]> = [
  ['defaults', []],
  ['compat=0.10', ['-o', 'compat=0.10']],
  ['cluster_size=512 (refcount table grows)', ['-o', 'cluster_size=512']],
  ['cluster_size=2M', ['-o', 'cluster_size=2M']],
  ['refcount_bits=1', ['-o', 'refcount_bits=1,cluster_size=4k']],
  ['refcount_bits=64', ['-o', 'refcount_bits=64']],
  ['extended_l2=on', ['-o', 'extended_l2=on']],
  ['lazy_refcounts=on', ['-o', 'lazy_refcounts=on']],
  ['compression_type=zstd', ['-o', 'compression_type=zstd']],
  ['preallocation=metadata', ['-o', 'preallocation=metadata']],
  ['preallocation=falloc', ['-o', 'preallocation=falloc']],
  ['preallocation=full', ['-o', 'preallocation=full,cluster_size=128k']],
  ['-m 1 in order', ['-m', '1']],
  ['-W -m 16 with 256 KiB buffers', ['-W', '-m', '16', '--buffer-size', '256k']],
  ['-S 0 (everything written)', ['-S', '0']],
  ['data_file', ['-o', `data_file=${path.join(dir, 'v-data.raw')}`]],
  ['data_file with extended_l2', ['-o', `data_file=${path.join(dir, 'v-data-ext.raw')},extended_l2=on`]],
  [
    'data_file_raw (the data file is the raw image)',
    ['-o', `data_file=${path.join(dir, 'v-data-raw.raw')},data_file_raw=on`],
  ],
];
for (const [name, args] of variants) {
  convertTo(name, async () => {
    const out = path.join(dir, `v-${name.replace(/[^a-z0-9]+/gi, '_')}.qcow2`);
    const r = await cliAsync('convert', '-O', 'qcow2', ...args, source, out);
    assert.is(r.status, 0, r.stderr);
    assertClean(out);
    assertSame(source, out);
    const info = JSON.parse(qemuImg('info', '--output=json', out)) as {
      format: string;
      'virtual-size': number;
      'format-specific': { data: Record<string, unknown> };
    };
    assert.is(info.format, 'qcow2');
    assert.is(info['virtual-size'], 24 * MiB);
    if (name.startsWith('compat=0.10')) assert.is(info['format-specific'].data.compat, '0.10');
    if (name.startsWith('extended_l2')) assert.is(info['format-specific'].data['extended-l2'], true);
    if (name.startsWith('lazy')) assert.is(info['format-specific'].data['lazy-refcounts'], true);
    if (name.startsWith('compression_type')) assert.is(info['format-specific'].data['compression-type'], 'zstd');
    if (name.startsWith('refcount_bits=1')) assert.is(info['format-specific'].data['refcount-bits'], 1);
    if (name.startsWith('cluster_size=512'))
      assert.is.not(headerOf(out).refcountTableOffset, 512, 'the refcount table moved');
    if (name.startsWith('data_file'))
      assert.ok(info['format-specific'].data['data-file'], 'qemu-img info names the data file');
    if (name.startsWith('data_file_raw'))
      assert.ok(
        fs.readFileSync(path.join(dir, 'v-data-raw.raw')).equals(fs.readFileSync(source)),
        'the raw data file equals the source',
      );
    // qemu-io reads it too.
    qemuIo(out, ['read -P 0x55 12M 2M', 'read -P 0 14M 64k'], ['-r']);
    fs.rmSync(out);
  });
}
convertTo('size: blockconv allocates what qemu-img allocates', async () => {
  const ours = path.join(dir, 'size-ours.qcow2');
  const theirs = path.join(dir, 'size-theirs.qcow2');
  const r = await cliAsync('convert', '-O', 'qcow2', source, ours);
  assert.is(r.status, 0, r.stderr);
  qemuImg('convert', '-O', 'qcow2', source, theirs);
  const used = (f: string) =>
    (JSON.parse(qemuImg('check', '--output=json', f)) as { 'allocated-clusters': number })['allocated-clusters'];
  assert.is(used(ours), used(theirs));
});
convertTo("bad options get qemu-img's kind of error", async () => {
  const out = path.join(dir, 'bad.qcow2');
  const cases: Array<[string, RegExp]> = [
    ['cluster_size=1000', /power of two between 512 and 2048k/],
    ['compat=0.10,lazy_refcounts=on', /lazy refcounts only supported with compatibility level 1.1/],
    ['refcount_bits=3', /power of two/],
    ['compat=0.10,refcount_bits=8', /require compatibility level 1.1/],
    ['extended_l2=on,cluster_size=4k', /at least 16384/],
    ['data_file_raw=on', /only be used with data_file/],
    ['compat=0.10,data_file=x.raw', /compatibility level 1.1/],
    ['preallocation=maybe', /invalid preallocation mode/],
    ['backing_fmt=raw', /backing format cannot be used without backing file/],
    ['colour=blue', /invalid option "colour"/],
  ];
  for (const [o, re] of cases) {
    const r = await cliAsync('convert', '-O', 'qcow2', '-o', o, source, out);
    assert.is.not(r.status, 0, o);
    assert.match(r.stderr, re, o);
    assert.is(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
  }
  const help = await cliAsync('convert', '-O', 'qcow2', '-o', 'help', source, out);
  assert.is(help.status, 0);
  for (const name of [
    'cluster_size',
    'compat',
    'lazy_refcounts',
    'refcount_bits',
    'compression_type',
    'extended_l2',
    'preallocation',
    'backing_file',
    'backing_fmt',
    'data_file',
  ]) {
    assert.match(help.stdout, new RegExp(`\\b${name}\\b`), name);
  }
});
// Compressed output: text-like data compresses, so every data cluster of it is stored compressed.
const textLike = path.join(dir, 'text.raw');
function makeTextLike(): void {
  if (fs.existsSync(textLike)) return;
  // Random hex digits: they shrink to about 60 %, as real data might.
  const chunk = Buffer.from(randomBytes(MiB / 2).toString('hex'));
  fs.writeFileSync(textLike, '');
  fs.truncateSync(textLike, 12 * MiB + 1536);
  const fd = fs.openSync(textLike, 'r+');
  for (const at of [0, 1 * MiB, 3 * MiB + 4096, 8 * MiB]) fs.writeSync(fd, chunk, 0, chunk.length, at);
  fs.writeSync(fd, chunk, 0, 1536, 12 * MiB);
  fs.closeSync(fd);
}
for (const [name, options, env] of [
  ['zlib', 'compression_type=zlib', {}],
  ['zstd', 'compression_type=zstd', {}],
  ['zlib, 4 KiB clusters', 'compression_type=zlib,cluster_size=4k', {}],
  ['zstd, extended L2', 'compression_type=zstd,extended_l2=on', {}],
  ['zlib through node:zlib (no native codec)', 'compression_type=zlib', { BLOCKCONV_NATIVE_CODEC: '0' }],
] as const) {
  convertTo(`convert -c: ${name}`, async () => {
    makeTextLike();
    const ours = path.join(dir, 'c-ours.qcow2');
    const theirs = path.join(dir, 'c-theirs.qcow2');
    fs.rmSync(ours, { force: true });
    fs.rmSync(theirs, { force: true });
    const saved = { ...process.env };
    Object.assign(process.env, env);
    try {
      const r = await cliAsync('convert', '-c', '-W', '-O', 'qcow2', '-o', options, textLike, ours);
      assert.is(r.status, 0, r.stderr);
    } finally {
      process.env = saved;
    }
    qemuImg('convert', '-c', '-O', 'qcow2', '-o', options, textLike, theirs);
    assertClean(ours);
    assertSame(textLike, ours);
    const stats = (f: string) =>
      JSON.parse(qemuImg('check', '--output=json', f)) as {
        'compressed-clusters': number;
        'allocated-clusters': number;
      };
    assert.is(
      stats(ours)['compressed-clusters'],
      stats(theirs)['compressed-clusters'],
      'as many compressed clusters as qemu-img',
    );
    const size = (f: string) => fs.statSync(f).size;
    // Node's own zlib (the fallback) finds better matches than Debian's: smaller is fine.
    assert.ok(size(ours) <= 1.02 * size(theirs), `size ${size(ours)} at most 2% over qemu-img's ${size(theirs)}`);
    qemuIo(ours, ['read -v 3M 64k'], ['-r']);
    const check = await cliAsync('check', ours);
    assert.is(check.status, 0, check.stdout);
  });
}
convertTo('convert -B: only what differs from the backing file is written, as qemu-img does', async () => {
  const base = create(path.join(dir, 'B-base.qcow2'), 64 * MiB);
  qemuIo(base, ['write -P 1 0 16M', 'write -P 2 32M 8M']);
  const top = create(path.join(dir, 'B-top.qcow2'), 64 * MiB, { backing_file: 'B-base.qcow2', backing_fmt: 'qcow2' });
  qemuIo(top, ['write -P 3 4M 1M', 'write -z 33M 64k', 'write -P 4 50M 100k', 'write -P 1 8M 64k']);
  for (const extra of [[], ['-o', 'cluster_size=4k'], ['-W', '-m', '16']]) {
    const ours = path.join(dir, 'B-ours.qcow2');
    const theirs = path.join(dir, 'B-theirs.qcow2');
    fs.rmSync(ours, { force: true });
    fs.rmSync(theirs, { force: true });
    const r = await cliAsync('convert', '-O', 'qcow2', ...extra, '-B', 'B-base.qcow2', '-F', 'qcow2', top, ours);
    assert.is(r.status, 0, r.stderr);
    qemuImg(
      'convert',
      '-O',
      'qcow2',
      ...extra.filter((a) => a !== '-W' && a !== '-m' && a !== '16'),
      '-B',
      'B-base.qcow2',
      '-F',
      'qcow2',
      top,
      theirs,
    );
    assertClean(ours);
    assertSame(top, ours);
    const info = JSON.parse(qemuImg('info', '--output=json', ours)) as {
      'backing-filename': string;
      'backing-filename-format': string;
    };
    assert.is(info['backing-filename'], 'B-base.qcow2');
    assert.is(info['backing-filename-format'], 'qcow2');
    // qemu-img copies whatever the source's top layer allocates; blockconv compares contents,
    // so the cluster at 8M, rewritten in the top with the base's bytes, stays unallocated.
    const used = (f: string) =>
      (JSON.parse(qemuImg('check', '--output=json', f)) as { 'allocated-clusters': number })['allocated-clusters'];
    const cs = extra.includes('cluster_size=4k') ? 4096 : 65536;
    assert.is(used(ours), used(theirs) - 65536 / cs, `allocated clusters, ${extra.join(' ')}`);
    const at8M = (
      JSON.parse(qemuImg('map', '--output=json', ours)) as Array<{ start: number; length: number; depth: number }>
    ).find((m) => m.start <= 8 * MiB && 8 * MiB < m.start + m.length)!;
    assert.is(at8M.depth, 1, 'read from the backing file');
  }
  const refused = await cliAsync('convert', '-O', 'raw', '-B', 'B-base.qcow2', top, path.join(dir, 'B.raw'));
  assert.is.not(refused.status, 0);
});
convertTo('convert -c to a raw target is refused', async () => {
  const r = await cliAsync('convert', '-c', '-O', 'raw', source, path.join(dir, 'c.raw'));
  assert.is.not(r.status, 0);
  assert.match(r.stderr, /cannot store compressed data/);
});
convertTo.run();

// Random requests, several in flight at once, against a byte mirror of what the image must read.
const random = suite('random writes, zero writes and discards agree with a byte mirror');

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

interface RandomCase {
  name: string;
  options: Record<string, string>;
  backing?: boolean;
  size: number;
}
const cases: RandomCase[] = [
  { name: 'defaults', options: {}, size: 8 * MiB },
  { name: 'backing file', options: {}, backing: true, size: 8 * MiB },
  { name: 'compat=0.10 with a backing file', options: { compat: '0.10' }, backing: true, size: 8 * MiB },
  { name: 'compat=0.10', options: { compat: '0.10' }, size: 8 * MiB },
  { name: 'extended_l2 with a backing file', options: { extended_l2: 'on' }, backing: true, size: 8 * MiB },
  { name: 'extended_l2', options: { extended_l2: 'on', cluster_size: '32k' }, size: 8 * MiB },
  {
    name: 'cluster_size=512, size not a multiple of the cluster',
    options: { cluster_size: '512' },
    size: 3 * MiB + 1024,
  },
  {
    name: 'cluster_size=4k, refcount_bits=2, lazy refcounts',
    options: { cluster_size: '4k', refcount_bits: '2', lazy_refcounts: 'on' },
    backing: true,
    size: 4 * MiB,
  },
  { name: 'data_file', options: { data_file: path.join(dir, 'r-data.raw') }, size: 8 * MiB },
  {
    name: 'data_file_raw',
    options: { data_file: path.join(dir, 'r-data-raw.raw'), data_file_raw: 'on', cluster_size: '16k' },
    size: 6 * MiB + 4096,
  },
];
for (const c of cases) {
  random(c.name, async () => {
    const image = path.join(dir, `r-${c.name.replace(/[^a-z0-9]+/gi, '_')}.qcow2`);
    const mirror = new Uint8Array(c.size);
    const reg = registry();
    const options: Record<string, string> = { ...c.options };
    if (c.backing) {
      const base = `${image}.base.raw`;
      fs.writeFileSync(base, '');
      fs.truncateSync(base, c.size);
      qemuIo(base, ['write -P 0xb0 0 1M', `write -P 0xb1 ${2 * MiB} ${c.size - 2 * MiB - 4096}`], ['-f', 'raw']);
      mirror.set(fs.readFileSync(base));
      options.backing_file = path.basename(base);
      options.backing_fmt = 'raw';
    }
    const img = await reg.create(image, c.size, { format: 'qcow2', options });
    const next = rng(c.size + Object.keys(c.options).length);
    let seq = 1;
    try {
      for (let round = 0; round < 40; round++) {
        // Up to 6 requests at once, on disjoint ranges.
        const ops: Array<Promise<void>> = [];
        const taken: Array<[number, number]> = [];
        for (let i = 0; i < 6; i++) {
          const len = 1 + Math.floor(next() * (next() < 0.3 ? 300 * KiB : 20 * KiB));
          const off = Math.floor(next() * (c.size - len));
          if (taken.some(([a, b]) => off < b && a < off + len)) continue;
          taken.push([off, off + len]);
          const kind = next();
          if (kind < 0.65) {
            const data = new Uint8Array(len).fill(seq++ & 0xff || 1);
            mirror.set(data, off);
            ops.push(img.write(off, data));
          } else if (kind < 0.85) {
            mirror.fill(0, off, off + len);
            ops.push(img.writeZeroes(off, len, { mayUnmap: next() < 0.5 }));
          } else {
            // Discarded bytes may read either way; make the mirror and the image agree by zeroing afterwards.
            ops.push(img.discard(off, len).then(() => img.writeZeroes(off, len)));
            mirror.fill(0, off, off + len);
          }
        }
        await Promise.all(ops);
        if (round % 10 === 9) await img.flush();
      }
      const back = await img.read(0, c.size);
      assert.ok(Buffer.from(back).equals(Buffer.from(mirror)), 'reads back what was written');
    } finally {
      await img.close();
    }
    assertClean(image);
    const expected = `${image}.expected.raw`;
    fs.writeFileSync(expected, mirror);
    assertSame(expected, image);
    if (c.options.data_file_raw === 'on')
      assert.ok(
        fs.readFileSync(c.options.data_file!).equals(Buffer.from(mirror)),
        'the raw data file reads as the image',
      );
  });
}
random.run();

const refuse = suite('what is refused');
refuse('an image with the corrupt bit is not opened for writing', async () => {
  const image = create(path.join(dir, 'corrupt.qcow2'), 4 * MiB);
  qemuIo(image, ['write -P 1 0 64k']);
  patch(image, 72 + 7, [0x02]);
  let err: unknown;
  try {
    await registry().open(image);
  } catch (e) {
    err = e;
  }
  assert.instance(err, BlockError);
  assert.is((err as BlockError).code, 'EROFS');
  assert.match((err as BlockError).message, /marked corrupt/);
  const ro = await registry().open(image, { readOnly: true });
  await ro.close();
});
refuse('a lazy-refcounts image left dirty is not written before a repair', async () => {
  const image = create(path.join(dir, 'dirty.qcow2'), 4 * MiB, { lazy_refcounts: true });
  patch(image, 72 + 7, [0x01]);
  let err: unknown;
  try {
    await registry().open(image);
  } catch (e) {
    err = e;
  }
  assert.instance(err, BlockError);
  assert.match((err as BlockError).message, /check -r all/);
});
refuse('an image with internal snapshots is not written', async () => {
  const image = create(path.join(dir, 'snap.qcow2'), 4 * MiB);
  qemuImg('snapshot', '-c', 's1', image);
  let err: unknown;
  try {
    await registry().open(image);
  } catch (e) {
    err = e;
  }
  assert.instance(err, BlockError);
  assert.is((err as BlockError).code, 'ENOTSUP');
});
refuse.run();

// Regressions found in review: each was a real failure before its fix.
const review = suite('review regressions');
review('a small L2 cache with many concurrent partial writes: nothing lost, image clean', async () => {
  const image = path.join(dir, 'rv-cache.qcow2');
  const cs = 65536;
  const span = 512 * MiB; // one L2 table's coverage
  let img = await registry().create(image, 4 * span, { format: 'qcow2' });
  for (let t = 0; t < 4; t++) await img.write(t * span, new Uint8Array(cs).fill(1));
  await img.close();
  img = await registry().open(image, { options: { 'l2-cache-size': '128k' } });
  const next = rng(99);
  const writes: Array<[number, Uint8Array]> = [];
  const used = new Set<number>();
  for (let i = 0; writes.length < 1200; i++) {
    const c = Math.floor(next() * 4 * 8000) + 1;
    if (used.has(c)) continue;
    used.add(c);
    const off = Math.floor(c / 8000) * span + (c % 8000) * cs + 512 * Math.floor(next() * 100);
    writes.push([off, new Uint8Array(512 * (1 + Math.floor(next() * 40))).fill((i % 250) + 2)]);
  }
  for (let i = 0; i < writes.length; i += 32)
    await Promise.all(writes.slice(i, i + 32).map(([off, d]) => img.write(off, d)));
  await img.close();
  assertClean(image);
  const ro = await registry().open(image, { readOnly: true });
  try {
    for (const [off, d] of writes)
      assert.ok(Buffer.from(await ro.read(off, d.length)).equals(Buffer.from(d)), `write at ${off}`);
  } finally {
    await ro.close();
  }
});
review(
  'compressed clusters overwritten in part, concurrently, through a tiny cache: refcounts stay right',
  async () => {
    const image = path.join(dir, 'rv-comp.qcow2');
    const cs = 4096;
    const size = 8 * MiB;
    let img = await registry().create(image, size, { format: 'qcow2', options: { cluster_size: '4096' } });
    const chunk = new Uint8Array(256 * 1024);
    for (let j = 0; j < chunk.length; j += 64) chunk[j] = j & 0xff;
    for (let o = 0; o < size; o += chunk.length) await img.write(o, chunk, { compress: true });
    await img.close();
    img = await registry().open(image, { options: { 'l2-cache-size': '8k' } });
    const next = rng(7);
    const clusters = [...new Set(Array.from({ length: 600 }, () => Math.floor(next() * (size / cs))))];
    for (let i = 0; i < clusters.length; i += 16)
      await Promise.all(clusters.slice(i, i + 16).map((c) => img.write(c * cs + 512, new Uint8Array(1024).fill(9))));
    await img.close();
    assertClean(image);
  },
);
review('compressed writes with refcount_bits 1 and 2: a full host cluster takes no more data', async () => {
  for (const bits of ['1', '2']) {
    const out = path.join(dir, `rv-rc${bits}.qcow2`);
    makeTextLike();
    const r = await cliAsync('convert', '-c', '-O', 'qcow2', '-o', `refcount_bits=${bits}`, textLike, out);
    assert.is(r.status, 0, r.stderr);
    assertClean(out);
    assertSame(textLike, out);
  }
});
review('extended L2: a discard racing an in-place write leaves a valid entry', async () => {
  for (let round = 0; round < 20; round++) {
    const image = path.join(dir, 'rv-race.qcow2');
    fs.rmSync(image, { force: true });
    const img = await registry().create(image, MiB, { format: 'qcow2', options: { extended_l2: 'on' } });
    await img.write(0, new Uint8Array(2048).fill(1));
    await img.flush();
    await Promise.all([img.write(5 * 2048, new Uint8Array(2048).fill(2)), img.discard(0, 65536)]);
    await img.close();
    assertClean(image);
  }
});
review('a zero write over a huge range keeps the table cache within its bound', async () => {
  const base = path.join(dir, 'rv-zero-base.raw');
  fs.writeFileSync(base, '');
  fs.truncateSync(base, 4 * MiB);
  const image = path.join(dir, 'rv-zero.qcow2');
  await (
    await registry().create(image, 64 * 1024 * MiB, {
      format: 'qcow2',
      options: { backing_file: base, backing_fmt: 'raw' },
    })
  ).close();
  const img = await registry().open(image, { options: { 'l2-cache-size': '256k' } });
  await img.writeZeroes(0, 64 * 1024 * MiB);
  const stats = (img as unknown as { cacheStats: { tables: number; capacity: number } }).cacheStats;
  assert.ok(stats.tables <= stats.capacity, `${stats.tables} tables cached, capacity ${stats.capacity}`);
  await img.close();
  assertClean(image);
});
review.run();

// The conformance kit, read-write, on new images of several layouts.
for (const [name, options] of [
  ['defaults', {}],
  ['compat=0.10', { compat: '0.10' }],
  ['extended_l2', { extended_l2: 'on' }],
] as const) {
  for (const cache of ['writeback', 'none'] as const) {
    conformance(`qcow2 read-write ${name} (cache=${cache})`, {
      open: async () => {
        const image = path.join(dir, `conf-${name}-${cache}-${Math.random().toString(36).slice(2)}.qcow2`);
        const backend: BlockBackend = await registry().create(image, 9 * MiB, {
          format: 'qcow2',
          cache,
          options: { ...options },
        });
        return {
          backend,
          reopen: () => registry().open(image, { cache }),
          openReadOnly: () => registry().open(image, { readOnly: true, cache }),
          cleanup: async () => {
            assertClean(image);
            fs.rmSync(image, { force: true });
          },
        };
      },
    });
  }
}
