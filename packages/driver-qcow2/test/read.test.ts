/**
 * The read path's properties: exports and probe, coalesced protocol reads, a bounded
 * L2 cache whose concurrent misses share one read, long block-status extents from
 * cached tables, O_DIRECT files below (alignment and bounce buffers), the options,
 * and the conformance kit on qcow2 images opened read-only.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError, DriverRegistry, SegmentList, type BlockBackend } from '@blockconv/core';
import { conformance } from '@blockconv/core/testkit';
import { drivers as rawDrivers, fileDriver } from '@blockconv/driver-raw';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import defaultDrivers, { drivers, openQcow2, qcow2Driver, type Qcow2Backend } from '../src/index.js';
import { zstdFrameLength } from '../src/compression.js';
import { TableCache } from '../src/cache.js';
import {
  KiB,
  MiB,
  blockError,
  create,
  qemuConvert,
  qemuImg,
  qemuIo,
  readAll,
  readWhole,
  registry,
  removeDir,
  spyOn,
  spyRegistry,
  tempDir,
  writeMixed,
} from './helpers.js';

let dir = '';
const setup = (): void => {
  dir = tempDir();
};
const teardown = (): void => removeDir(dir);

const api = suite('exports and probe');
api('exports', () => {
  assert.equal(drivers, [qcow2Driver]);
  assert.is(defaultDrivers, drivers);
  assert.is(qcow2Driver.kind, 'format');
  assert.is(qcow2Driver.name, 'qcow2');
  const head = new Uint8Array(4096);
  head.set([0x51, 0x46, 0x49, 0xfb]);
  assert.is(qcow2Driver.probe!(head, 'x'), 100);
  assert.is(qcow2Driver.probe!(new Uint8Array(4096), 'x'), 0);
  assert.is(qcow2Driver.probe!(new Uint8Array(2), 'x'), 0);
});
api.run();

const units = suite('table cache and zstd frames');
units('the cache is bounded, evicts the least recently used, and shares concurrent misses', async () => {
  const loads: number[] = [];
  const cache = new TableCache(3 * 4096, 4096, async (off) => {
    loads.push(off);
    await new Promise((r) => setTimeout(r, 5));
    return new Uint8Array(4096).fill(off / 4096);
  });
  assert.is(cache.capacity, 3);
  const same = await Promise.all([cache.get(4096), cache.get(4096), cache.get(4096)]);
  assert.equal(loads, [4096], 'one read for three concurrent misses');
  assert.ok(same[0] === same[1] && same[1] === same[2]);
  await cache.get(8192);
  await cache.get(12288);
  assert.ok(cache.peek(4096), 'touch 4096: 8192 is now the oldest');
  await cache.get(16384);
  assert.is(cache.size, 3);
  assert.is(cache.peek(8192), undefined, 'least recently used evicted');
  assert.ok(cache.peek(4096) && cache.peek(12288) && cache.peek(16384));
  assert.is(new TableCache(1, 65536, async () => new Uint8Array(0)).capacity, 2, 'never fewer than two tables');
});

units('zstd frame measurement refuses what would be unsafe', () => {
  const ref = { location: 'x', host: 0, guest: 0 };
  // Magic, FHD (single segment, 2-byte content size), size 65536, one last raw block of 3 bytes.
  const frame = [0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0xff, 0x19, 0x00, 0x00, 1, 2, 3];
  assert.is(zstdFrameLength(new Uint8Array([...frame, 9, 9, 9]), 65536, ref), frame.length, 'trailing bytes excluded');
  const fails = (bytes: number[], re: RegExp): void => {
    try {
      zstdFrameLength(new Uint8Array(bytes), 65536, ref);
    } catch (err) {
      assert.instance(err, BlockError);
      assert.match((err as BlockError).message, re);
      return;
    }
    assert.unreachable(`accepted ${bytes}`);
  };
  fails(frame.slice(0, 11), /truncated/);
  fails([0x28, 0xb5, 0x2f, 0xfe, ...frame.slice(4)], /bad frame magic/);
  fails(
    [0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0x00, 0x19, 0x00, 0x00, 1, 2, 3],
    /content size 256 is not the cluster size/,
  );
  fails([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8, 0x19, 0x00, 0x00, 1, 2, 3], /window of \d+ bytes is too large/);
  fails([0x28, 0xb5, 0x2f, 0xfd, 0x61, 0x07, 0x00, 0xff, ...frame.slice(7)], /needs a dictionary/);
  fails([0x28, 0xb5, 0x2f, 0xfd, 0x60, 0x00, 0xff, 0x07, 0x00, 0x00], /reserved block type/);
});
units.run();

const io = suite('read path: coalescing, cache, block status');
io.before(setup);
io.after(teardown);

io('contiguous clusters are read with one request; a 2 MiB read costs one data read', async () => {
  const f = create(path.join(dir, 'seq.qcow2'), 8 * MiB);
  qemuIo(f, ['write -P 1 0 8M']);
  const { reg, stats } = spyRegistry({ log: true });
  const img = await reg.open(f, { readOnly: true });
  try {
    const s = stats.get(f)!;
    const before = s.reads;
    await img.read(2 * MiB, 2 * MiB, new Uint8Array(2 * MiB));
    const reads = s.log.slice(before);
    assert.equal(reads.filter(([, len]) => len === 2 * MiB).length, 1, `one 2 MiB read, got ${JSON.stringify(reads)}`);
    assert.ok(reads.length <= 2, 'plus at most the L2 table');
    const ext = await img.blockStatus(0, 1);
    assert.is(ext.kind, 'data');
    assert.is(ext.length, 8 * MiB, 'one extent for the whole image');
  } finally {
    await img.close();
  }
});

io('readSegments: guest ranges around holes read as read() does, data runs in one request below', async () => {
  const c = 64 * KiB;
  const base = create(path.join(dir, 'segs-base.qcow2'), 4 * MiB);
  qemuIo(base, ['write -P 0x77 0 4M']);
  const plain = create(path.join(dir, 'segs.qcow2'), 4 * MiB, { backing_file: base, backing_fmt: 'qcow2' });
  writeMixed(plain, c, 4 * MiB);
  const raw = create(path.join(dir, 'segs.raw'), 4 * MiB, {}, 'raw');
  qemuIo(raw, ['write -P 9 0 1M', `write -P 8 ${2 * MiB} 1M`], ['-f', 'raw']);
  const packed = path.join(dir, 'segs-c.qcow2');
  qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', raw, packed);
  // Odd offsets and lengths, ranges that cross runs of every kind, out of order in the buffer.
  const ranges = [
    [0, 3 * c + 17],
    [5 * c - 100, 4296],
    [8 * c + 1, 3 * c],
    [MiB - 513, 2 * MiB + 1024],
    [4 * MiB - 8192, 8192],
  ];
  for (const f of [plain, packed]) {
    const { reg, stats } = spyRegistry({ log: true });
    const img = await reg.open(f, { readOnly: true });
    try {
      let at = 0;
      const segs = new Float64Array(3 * ranges.length);
      ranges.forEach(([o, n], i) => {
        segs.set([o!, n!, at], 3 * i);
        at += n! + 11;
      });
      const into = new Uint8Array(at).fill(0xee);
      const s = stats.get(f)!;
      await img.read(0, 4 * MiB, new Uint8Array(4 * MiB)); // tables cached: count data requests only
      const before = s.requests;
      await img.readSegments!(into, new SegmentList(segs, ranges.length));
      if (f === plain)
        assert.is(s.requests - before, 1, 'the data runs of all ranges in one request to the image file');
      for (let i = 0; i < ranges.length; i++) {
        const [o, n] = ranges[i]!;
        const want = await img.read(o!, n!, new Uint8Array(n!));
        const pos = segs[3 * i + 2]!;
        assert.ok(Buffer.from(into.subarray(pos, pos + n!)).equals(want), `${path.basename(f)}: range ${o}+${n}`);
        assert.ok(
          into.subarray(pos + n!, pos + n! + 11).every((b) => b === 0xee || pos + n! >= into.length),
          'nothing written between ranges',
        );
      }
    } finally {
      await img.close();
    }
  }
});

io('neighbouring compressed clusters are fetched with one read and decompressed in parallel', async () => {
  const src = create(path.join(dir, 'cmp.raw'), 4 * MiB, {}, 'raw');
  qemuIo(src, ['write -P 3 0 4M'], ['-f', 'raw']);
  for (const type of ['zlib', 'zstd']) {
    const f = path.join(dir, `cmp-${type}.qcow2`);
    qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, src, f);
    const { reg, stats } = spyRegistry({ log: true });
    const img = await reg.open(f, { readOnly: true });
    try {
      const s = stats.get(f)!;
      const before = s.reads;
      const got = await img.read(0, 2 * MiB, new Uint8Array(2 * MiB));
      assert.ok(
        got.every((b) => b === 3),
        `${type}: data`,
      );
      assert.ok(
        s.reads - before <= 2,
        `${type}: 32 compressed clusters in ${s.reads - before} reads (one for the L2 table)`,
      );
      const ext = await img.blockStatus(0, 1);
      assert.equal(
        ext,
        { kind: 'data', length: 4 * MiB },
        `${type}: compressed clusters merge into one extent without offset`,
      );
    } finally {
      await img.close();
    }
  }
});

io('the L2 cache stays within l2-cache-size; concurrent readers of one table share its read', async () => {
  const f = create(path.join(dir, 'many.qcow2'), 4 * MiB, { cluster_size: 512 });
  qemuIo(f, ['write -P 5 0 4M']);
  const { reg, stats } = spyRegistry({ log: true });
  const img = (await reg.open(f, { readOnly: true, options: { 'l2-cache-size': '4k' } })) as Qcow2Backend;
  try {
    assert.is(img.cacheStats.capacity, 8);
    const s = stats.get(f)!;
    const before = s.reads;
    // 16 readers of the same 32 KiB (one L2 table), at once.
    const bufs = await Promise.all(
      Array.from({ length: 16 }, () => img.read(64 * KiB, 32 * KiB, new Uint8Array(32 * KiB))),
    );
    assert.ok(bufs.every((b) => b.every((x) => x === 5)));
    const tableReads = s.log.slice(before).filter(([, len]) => len === 512 && s.log.length > 0).length;
    assert.ok(
      img.cacheStats.misses === 1,
      `one miss, got ${JSON.stringify(img.cacheStats)} (${tableReads} table-sized reads)`,
    );
    const all = await readWhole(img); // 128 tables through an 8-table cache
    assert.ok(all.every((x) => x === 5));
    assert.ok(img.cacheStats.tables <= 8, `${img.cacheStats.tables} tables cached`);
  } finally {
    await img.close();
  }
});

io('block status answers from cached tables and stops at uncached ones after a few reads', async () => {
  const f = create(path.join(dir, 'frag.qcow2'), 64 * MiB, { cluster_size: 4096 });
  // 4 KiB clusters: one L2 table maps 2 MiB; 32 tables of zero clusters (data would not be
  // host-contiguous across tables: qemu puts each new L2 table between the data clusters).
  qemuIo(f, ['write -z 0 64M']);
  const { reg, stats } = spyRegistry();
  const img = await reg.open(f, { readOnly: true });
  try {
    const s = stats.get(f)!;
    const before = s.reads;
    const ext = await img.blockStatus(0, img.size);
    assert.is(ext.kind, 'zero');
    assert.ok(
      ext.length >= 8 * MiB && ext.length < 64 * MiB,
      `extent of ${ext.length} bytes from a bounded number of table reads`,
    );
    assert.ok(s.reads - before <= 5, `${s.reads - before} table reads`);
    // Asked again, the cached part is walked without I/O and at most the budget of new tables is read.
    const again = s.reads;
    const ext2 = await img.blockStatus(0, img.size);
    assert.ok(
      ext2.length > ext.length && s.reads - again <= 4,
      `${ext2.length} bytes, ${s.reads - again} more table reads`,
    );
    const inside = s.reads;
    const ext3 = await img.blockStatus(MiB, MiB);
    assert.ok(s.reads - inside <= 4, 'never more than the budget per call');
    assert.is(ext3.kind, 'zero');
    assert.ok(MiB + ext3.length > ext2.length, 'the extent runs past the cached tables');
  } finally {
    await img.close();
  }
});

io('O_DIRECT below, 512-byte clusters, compressed and backing data: aligned requests, same bytes', async () => {
  const base = create(path.join(dir, 'od-base.raw'), 3 * MiB + 1536, {}, 'raw');
  qemuIo(base, ['write -P 0x61 0 3M'], ['-f', 'raw']);
  const f = create(path.join(dir, 'od.qcow2'), 4 * MiB, {
    cluster_size: 512,
    backing_file: 'od-base.raw',
    backing_fmt: 'raw',
  });
  qemuIo(f, ['write -P 1 1000k 100k', 'write -c -P 2 2M 512', 'write -z 2560k 2k', 'write -P 3 3M 512']);
  const ref = path.join(dir, 'od.raw');
  qemuConvert(f, ref);
  const want = fs.readFileSync(ref);
  // Every file read goes through a check of the O_DIRECT contract.
  const misaligned: string[] = [];
  const checked = {
    ...fileDriver,
    async open(location: string, options: Parameters<typeof fileDriver.open>[1]) {
      const b = await fileDriver.open(location, options);
      return spyOn(b, (offset, length) => {
        const a = b.limits.requestAlignment;
        if (offset % a !== 0 || (length % a !== 0 && offset + length !== b.size))
          misaligned.push(`${location} ${offset}+${length}`);
      });
    },
  };
  const reg = new DriverRegistry().register(...rawDrivers, ...drivers, checked);
  const img = await reg.open(f, { readOnly: true, cache: 'none' });
  try {
    assert.is(img.limits.requestAlignment, 4096);
    assert.is(img.limits.minMemAlignment, 4096);
    assert.type(img.allocBuffer, 'function');
    const got = Buffer.alloc(img.size);
    for (const [off, len] of [
      [0, img.size],
      [4096, 8192],
      [2 * MiB - 4096, 12288],
    ] as const) {
      const part = await img.read(off, len, img.allocBuffer!(len));
      got.set(part, off);
      assert.ok(Buffer.from(part).equals(want.subarray(off, off + len)), `${off}+${len}`);
    }
    assert.equal(misaligned, [], 'every protocol read aligned');
  } finally {
    await img.close();
  }
});

io('options: l2-cache-size and snapshot selection validated; data-file override', async () => {
  const f = create(path.join(dir, 'opt.qcow2'), MiB);
  qemuIo(f, ['write -P 1 0 64k']);
  qemuImg('snapshot', '-c', 's1', f);
  let err = await blockError(readAll(f, { options: { 'l2-cache-size': 'lots' } }));
  assert.is(err.code, 'EINVAL');
  err = await blockError(readAll(f, { options: { snapshot: 's1', 'snapshot.id': '1' } }));
  assert.is(err.code, 'EINVAL');
  err = await blockError(readAll(f, { options: { 'data-file': '/nonexistent' } }));
  assert.match(err.message, /only for images with an external data file/);
  // The data file found through the option instead of the stored name.
  const data = path.join(dir, 'moved.data');
  const g = create(path.join(dir, 'df.qcow2'), MiB, { data_file: path.join(dir, 'orig.data') });
  qemuIo(g, ['write -P 7 0 64k']);
  fs.renameSync(path.join(dir, 'orig.data'), data);
  const got = await readAll(g, { options: { 'data-file': data } });
  assert.ok(got.subarray(0, 64 * KiB).every((b) => b === 7) && got.subarray(64 * KiB).every((b) => b === 0));
});

io('a relative data file name is found next to the image, whatever the working directory', async () => {
  const sub = path.join(dir, 'rel');
  fs.mkdirSync(sub);
  const f = path.join(sub, 'rel.qcow2');
  const cwd = process.cwd();
  process.chdir(sub);
  try {
    create('rel.qcow2', MiB, { data_file: 'rel.data' }); // QEMU itself resolves this from its cwd
    qemuIo('rel.qcow2', ['write -P 9 0 4k']);
  } finally {
    process.chdir(cwd);
  }
  const got = await readAll(f);
  assert.ok(got.subarray(0, 4096).every((b) => b === 9));
});

io('reads and block status outside the image, and use after close, are clean errors', async () => {
  const f = create(path.join(dir, 'edge.qcow2'), MiB);
  const img = await registry().open(f, { readOnly: true });
  assert.is((await blockError(img.read(MiB - 512, 1024))).code, 'ERANGE');
  assert.is((await blockError(img.blockStatus(MiB, 1))).code, 'ERANGE');
  assert.is((await blockError(img.write(0, new Uint8Array(512)))).code, 'EROFS');
  await img.close();
  assert.is((await blockError(img.read(0, 512))).code, 'EBADF');
});

io('opening without a resolver: fine without a backing file, a clear error with one', async () => {
  const f = create(path.join(dir, 'nores.qcow2'), MiB);
  const g = create(path.join(dir, 'nores-top.qcow2'), MiB, { backing_file: 'nores.qcow2', backing_fmt: 'qcow2' });
  const file = await fileDriver.open(f, { readOnly: true });
  const img = await openQcow2(file, {});
  assert.is(img.size, MiB);
  await img.close();
  const file2 = await fileDriver.open(g, { readOnly: true });
  const err = await blockError(openQcow2(file2, {}));
  await file2.close();
  assert.is(err.code, 'ENOTSUP');
  assert.match(err.message, /no resolver/);
});
io.run();

// The conformance kit, read-only, on images with every kind of cluster.
let confDir = '';
function conformanceImage(): string {
  if (!confDir) {
    confDir = tempDir('blockconv-qcow2-conf-');
    process.on('exit', () => removeDir(confDir));
    const base = create(path.join(confDir, 'base.qcow2'), 9 * MiB);
    qemuIo(base, ['write -P 0x10 0 9M']);
    const top = create(path.join(confDir, 'top.qcow2'), 9 * MiB, {
      backing_file: 'base.qcow2',
      backing_fmt: 'qcow2',
      extended_l2: true,
    });
    qemuIo(top, [
      'write -P 1 0 64k',
      'write -P 2 100k 3k',
      'write -z 1M 512k',
      'write -c -P 3 4M 64k',
      'write -z -u 6M 64k',
    ]);
  }
  return path.join(confDir, 'top.qcow2');
}

for (const cache of ['writeback', 'none'] as const) {
  conformance(`qcow2 read-only (cache=${cache})`, {
    readOnly: true,
    open: async () => {
      const image = conformanceImage();
      const backend: BlockBackend = await registry().open(image, { readOnly: true, cache });
      return { backend, openReadOnly: () => registry().open(image, { readOnly: true, cache }) };
    },
  });
}
