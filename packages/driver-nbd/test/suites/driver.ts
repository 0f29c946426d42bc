// What the driver makes of each server's features: block status against the file's real
// map, zeroing with and without holes, multi-conn, read-only exports, export names, and
// the requests it sends (nbdkit's stats filter counts them).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { openNbd } from '../../src/index.js';
import { MiB, failure, nbdkit, qemuNbd, run, sparseImage, tmpDir } from '../helpers.js';

const test = suite('nbd driver');
let dir: string;
test.before.each(() => {
  dir = tmpDir();
});
test.after.each(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Data ranges of a raw file as qemu-img map sees them, merged. */
function dataRanges(file: string): [number, number][] {
  const map = JSON.parse(run('qemu-img', ['map', '--output=json', '-f', 'raw', file])) as {
    start: number;
    length: number;
    data: boolean;
    zero: boolean;
  }[];
  const out: [number, number][] = [];
  for (const e of map) {
    if (!e.data || e.zero) continue;
    const last = out[out.length - 1];
    if (last && last[1] === e.start) last[1] += e.length;
    else out.push([e.start, e.start + e.length]);
  }
  return out;
}

test("block status follows the exported file's allocation, from few requests", async () => {
  const file = path.join(dir, 'sparse.raw');
  sparseImage(file, 64 * MiB, [
    [1, 2],
    [10, 1],
    [40, 3],
    [63, 1],
  ]);
  const server = await qemuNbd(dir, file, 'raw', ['-r']);
  const b = await openNbd(server.url, { readOnly: true });
  try {
    const got: [number, number][] = [];
    for (let pos = 0; pos < b.size; ) {
      const e = await b.blockStatus(pos, b.size - pos);
      if (e.kind === 'data') {
        const last = got[got.length - 1];
        if (last && last[1] === pos) last[1] += e.length;
        else got.push([pos, pos + e.length]);
      }
      pos += e.length;
    }
    assert.equal(got, dataRanges(file));
    assert.ok(b.stats.statusRequests <= 2, `${b.stats.statusRequests} block status requests for 9 extents`);
  } finally {
    await b.close();
    await server.stop();
  }
});

test('writeZeroes leaves a hole only when unmapping is allowed (NO_HOLE otherwise)', async () => {
  const file = path.join(dir, 'disk.raw');
  sparseImage(file, 16 * MiB, [[0, 16]]);
  const server = await qemuNbd(dir, file, 'raw');
  const b = await openNbd(server.url);
  try {
    await b.writeZeroes(0, 4 * MiB, { mayUnmap: true });
    await b.writeZeroes(8 * MiB, 4 * MiB, { mayUnmap: false });
    await b.flush();
    const got = Buffer.from(await b.read(0, 16 * MiB));
    assert.ok(
      got.subarray(0, 4 * MiB).every((x) => x === 0) && got.subarray(8 * MiB, 12 * MiB).every((x) => x === 0),
      'both read as zeroes',
    );
  } finally {
    await b.close();
    await server.stop();
  }
  // fallocate: a punched hole frees its blocks, zeroing with NO_HOLE keeps them.
  const allocated = fs.statSync(file).blocks * 512;
  assert.ok(allocated >= 11.5 * MiB && allocated <= 12.5 * MiB, `12 MiB stay allocated, not ${allocated / MiB} MiB`);
});

test('multi-conn: 4 connections by default, requests spread over them, one flush covers all', async () => {
  const stats = path.join(dir, 'stats');
  const server = await nbdkit(dir, ['--filter=stats', 'memory', '64M', `statsfile=${stats}`]);
  const b = await openNbd(server.url);
  const data = Buffer.alloc(MiB, 7);
  const writes = Array.from({ length: 32 }, (_, i) => b.write(i * MiB, data));
  const peak = b.stats.inFlight;
  await Promise.all(writes);
  await b.flush();
  assert.is(b.stats.connections, 4);
  assert.ok(
    peak.every((n) => n === 8),
    `32 writes spread evenly: ${peak.join(',')}`,
  );
  const back = Buffer.from(await b.read(0, 32 * MiB));
  assert.ok(back.every((x) => x === 7));
  await b.close();
  await server.stop();
  const text = fs.readFileSync(stats, 'utf8');
  assert.match(text, /write: 32 ops/);
  assert.match(text, /flush: 1 ops/);
});

test('connections=N is honoured, and refused above 1 without multi-conn', async () => {
  const mem = await nbdkit(dir, ['memory', '16M']);
  const b = await openNbd(`${mem.url}&connections=2`);
  assert.is(b.stats.connections, 2);
  await b.close();
  const one = await openNbd(mem.url, { options: { connections: '1' } });
  assert.is(one.stats.connections, 1);
  await one.close();
  await mem.stop();
  const q = await nbdkit(dir, ['--filter=multi-conn', 'memory', '16M', 'multi-conn-mode=disable']);
  const err = await failure(() => openNbd(q.url, { options: { connections: '3' } }));
  assert.is(err.code, 'EINVAL');
  assert.match(err.message, /does not allow multi-conn/);
  const single = await openNbd(q.url);
  assert.is(single.stats.connections, 1, 'one connection without multi-conn');
  await single.close();
  await q.stop();
});

test('a read-only export is opened read-only and says why', async () => {
  const file = path.join(dir, 'disk.raw');
  sparseImage(file, 16 * MiB, [[0, 1]]);
  const server = await qemuNbd(dir, file, 'raw', ['-r']);
  const b = await openNbd(server.url);
  assert.is(b.readOnly, true);
  assert.match(b.readOnlyReason ?? '', /exports it read-only/);
  const e = await failure(() => b.write(0, Buffer.alloc(512)));
  assert.match(e.message, /write at offset 0 \(\+512\): .*read-only/, "the server's refusal, with its message");
  await b.close();
  await server.stop();
});

test('export names: the named one opens, an unknown one is ENOENT naming it', async () => {
  const file = path.join(dir, 'disk.raw');
  sparseImage(file, 16 * MiB, [[0, 1]]);
  const server = await qemuNbd(dir, file, 'raw', ['-x', 'vm disk']);
  const b = await openNbd(server.urlOf('vm disk'));
  assert.is(b.size, 16 * MiB);
  assert.is((await b.info()).export, 'vm disk');
  await b.close();
  const err = await failure(() => openNbd(server.urlOf('other')));
  assert.is(err.code, 'ENOENT');
  assert.match(err.message, /no export named "other"/);
  await server.stop();
});

test('zeroInitialized when the whole export reads as zeroes, not otherwise', async () => {
  const mem = await nbdkit(dir, ['memory', '1G']);
  const b = await openNbd(mem.url);
  assert.is(b.zeroInitialized, true, 'a new memory disk');
  await b.write(512 * MiB, Buffer.alloc(4096, 1));
  await b.close();
  const again = await openNbd(mem.url);
  assert.is(again.zeroInitialized, false, 'after a write');
  await again.close();
  const ro = await openNbd(mem.url, { readOnly: true });
  assert.is(ro.zeroInitialized, false, 'not asked of a read-only source');
  await ro.close();
  await mem.stop();
});

test('FUA goes out as the request flag; flush as NBD_CMD_FLUSH, none with cache=unsafe', async () => {
  const log = path.join(dir, 'log');
  const server = await nbdkit(dir, ['--filter=log', 'memory', '16M', `logfile=${log}`]);
  const b = await openNbd(server.url);
  await b.write(0, Buffer.alloc(4096, 1), { fua: true });
  await b.write(4096, Buffer.alloc(4096, 1));
  await b.flush();
  await b.close();
  const unsafe = await openNbd(server.url, { cache: 'unsafe' });
  await unsafe.write(0, Buffer.alloc(4096, 2), { fua: true });
  await unsafe.flush();
  await unsafe.close();
  await server.stop();
  const text = fs.readFileSync(log, 'utf8');
  assert.is((text.match(/Write id=\d+ offset=0x0 count=0x1000 fua=1 \.\.\./g) ?? []).length, 1, text);
  assert.is((text.match(/Write id=\d+ offset=0x1000 count=0x1000 fua=0 \.\.\./g) ?? []).length, 1);
  assert.is((text.match(/Flush id=\d+ \.\.\./g) ?? []).length, 1, 'one flush: none from the unsafe open');
});

test('a server without WRITE_ZEROES gets zero buffers', async () => {
  const server = await nbdkit(dir, ['--filter=nozero', 'memory', '16M', 'zeromode=none']);
  const b = await openNbd(server.url);
  assert.is(b.canZero, false);
  await b.write(0, Buffer.alloc(4 * MiB, 9));
  await b.writeZeroes(MiB, 2 * MiB);
  const got = Buffer.from(await b.read(0, 4 * MiB));
  assert.ok(got.subarray(MiB, 3 * MiB).every((x) => x === 0));
  assert.ok(got.subarray(0, MiB).every((x) => x === 9) && got.subarray(3 * MiB).every((x) => x === 9));
  await b.close();
  await server.stop();
});

test.run();
