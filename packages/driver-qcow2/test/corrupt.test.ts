/**
 * Damaged images, each made by patching bytes of a valid one: every one gives a
 * BlockError naming the field or table entry (and where it is), and none makes the
 * driver read outside a file or read much more than the file holds.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError } from '@blockconv/core';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import type { Qcow2Backend } from '../src/index.js';
import {
  KiB, MiB, be64, blockError, create, findL2Entry, firstL2, headerOf, patch, qemuImg, qemuIo, readAll, readBytes, readWhole,
  removeDir, spyRegistry, tempDir, u32, u64,
} from './helpers.js';

const test = suite('corrupt images');
let dir = '';
let n = 0;
test.before(() => { dir = tempDir(); });
test.after(() => removeDir(dir));

/** A valid image: 64 KiB clusters, data at 0..1 MiB and 2 MiB. */
function valid(options: Record<string, string | number | boolean> = {}): string {
  const f = create(path.join(dir, `img${n++}.qcow2`), 4 * MiB, options);
  qemuIo(f, ['write -P 1 0 1M', 'write -P 2 2M 64k']);
  return f;
}

function compressed(type: 'zlib' | 'zstd'): string {
  const src = create(path.join(dir, `src${n++}.raw`), 2 * MiB, {}, 'raw');
  qemuIo(src, ['write -P 3 0 1M'], ['-f', 'raw']);
  const f = path.join(dir, `c${n++}.qcow2`);
  qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, src, f);
  return f;
}

interface Expect { code: string; field?: string; offset?: number; message?: RegExp }

/** Opens and reads the whole image through a spying registry; it must fail as expected and stay inside the files. */
async function expectFailure(image: string, e: Expect, options: Record<string, string> = {}): Promise<BlockError> {
  const { reg, stats } = spyRegistry();
  const err = await blockError((async () => {
    const img = await reg.open(image, { readOnly: true, format: 'qcow2', options });
    try {
      await readWhole(img);
      // Block status walks every table too.
      for (let pos = 0; pos < img.size;) pos += (await img.blockStatus(pos, img.size - pos)).length;
    } finally {
      await img.close();
    }
  })());
  assert.is(err.code, e.code, err.message);
  if (e.field !== undefined) assert.is(err.field, e.field, err.message);
  if (e.offset !== undefined) assert.is(err.offset, e.offset, err.message);
  if (e.message) assert.match(err.message, e.message);
  for (const [file, s] of stats) {
    assert.is(s.outside, 0, `no read outside ${file}`);
    assert.ok(s.bytes <= 2 * s.size + MiB, `read ${s.bytes} bytes of a ${s.size}-byte file`);
  }
  return err;
}

test('truncated to less than a header', async () => {
  const f = valid();
  fs.truncateSync(f, 40);
  await expectFailure(f, { code: 'ECORRUPT', field: 'header', message: /too small to hold a qcow2 header/ });
});

test('truncated file: L2 table past the end', async () => {
  const f = valid();
  const h = headerOf(f);
  const { l1Index, l2Offset } = firstL2(f);
  fs.truncateSync(f, l2Offset + 4096);
  await expectFailure(f, { code: 'ECORRUPT', field: 'L1 entry', offset: h.l1Offset + 8 * l1Index, message: /L2 table at 0x[0-9a-f]+ lies outside the file/ });
});

test('truncated file: data clusters past the end', async () => {
  const f = valid();
  const { entry } = findL2Entry(f, (e) => e !== 0n);
  const firstData = Number(entry & 0x00ff_ffff_ffff_fe00n);
  fs.truncateSync(f, firstData + 64 * KiB * 4);
  await expectFailure(f, { code: 'ECORRUPT', field: 'L2 entry', message: /lies past the end of the file/ });
});

test('L1 table offset past the end of the file', async () => {
  const f = valid();
  patch(f, 40, u64(fs.statSync(f).size + 64 * KiB * 16));
  await expectFailure(f, { code: 'ECORRUPT', field: 'l1_table_offset', offset: 40, message: /runs past the end of the file/ });
});

test('L2 entry past the end of the file', async () => {
  const f = valid();
  const { at, entry } = findL2Entry(f, (e) => e !== 0n);
  patch(f, at, be64((entry & ~0x00ff_ffff_ffff_fe00n) | BigInt(1 << 30)));
  await expectFailure(f, { code: 'ECORRUPT', field: 'L2 entry', offset: at, message: /cluster offset 0x40000000 lies past the end of the file/ });
});

test('unaligned L2 table offset in the L1 table', async () => {
  const f = valid();
  const h = headerOf(f);
  const { l1Index, l2Offset } = firstL2(f);
  patch(f, h.l1Offset + 8 * l1Index, be64(BigInt(l2Offset + 512) | (1n << 63n)));
  await expectFailure(f, { code: 'ECORRUPT', field: 'L1 entry', offset: h.l1Offset + 8 * l1Index, message: /L2 table offset 0x[0-9a-f]+ is not aligned/ });
});

test('unaligned data cluster offset in an L2 entry', async () => {
  const f = valid();
  const { at, entry } = findL2Entry(f, (e) => e !== 0n);
  patch(f, at, be64(entry + 512n));
  await expectFailure(f, { code: 'ECORRUPT', field: 'L2 entry', offset: at, message: /is not aligned to a cluster/ });
});

for (const bits of [8, 22, 0xffffffff]) {
  test(`cluster_bits ${bits} out of range`, async () => {
    const f = valid();
    patch(f, 20, u32(bits));
    await expectFailure(f, { code: 'ECORRUPT', field: 'cluster_bits', offset: 20, message: new RegExp(`cluster_bits ${bits} is out of range`) });
  });
}

test('header_length too small, and larger than a cluster', async () => {
  const f = valid();
  patch(f, 100, u32(100));
  await expectFailure(f, { code: 'ECORRUPT', field: 'header_length', offset: 100, message: /header_length 100 is too small/ });
  patch(f, 100, u32(0x1000_0000));
  await expectFailure(f, { code: 'ECORRUPT', field: 'header_length', offset: 100, message: /exceeds the cluster size/ });
});

test('l1_size larger than the virtual size needs: refused when it cannot fit, read as qemu does when it can', async () => {
  const f = valid();
  patch(f, 36, u32(0x7fff_ffff));
  await expectFailure(f, { code: 'ECORRUPT', field: 'l1_size', offset: 36, message: /l1_size 2147483647 is too large/ });
  patch(f, 36, u32(0x0010_0000)); // within QEMU's limit, but 8 MiB of table in a small file
  await expectFailure(f, { code: 'ECORRUPT', field: 'l1_table_offset', message: /runs past the end of the file/ });
  // A few spare entries inside the file (as a shrunk image has) are fine and ignored.
  patch(f, 36, u32(8));
  const ref = path.join(dir, 'l1.raw');
  qemuImg('convert', '-O', 'raw', f, ref);
  assert.ok(Buffer.from(await readAll(f)).equals(fs.readFileSync(ref)));
});

test('l1_size too small for the virtual size', async () => {
  const f = valid();
  patch(f, 24, u64(2 ** 40)); // 1 TiB needs 2048 entries
  await expectFailure(f, { code: 'ECORRUPT', field: 'l1_size', offset: 36, message: /too small for the virtual size/ });
});

for (const type of ['zlib', 'zstd'] as const) {
  test(`compressed cluster descriptor past the end of the file (${type})`, async () => {
    const f = compressed(type);
    const { at, entry } = findL2Entry(f, (e) => (e & (1n << 62n)) !== 0n);
    const offsetMask = (1n << 54n) - 1n; // 64 KiB clusters: offset in bits 0..53
    patch(f, at, be64((entry & ~offsetMask) | BigInt(fs.statSync(f).size + 12345)));
    await expectFailure(f, { code: 'ECORRUPT', field: 'L2 entry', offset: at, message: /compressed cluster descriptor points to 0x[0-9a-f]+, outside the file/ });
  });

  test(`garbage compressed data (${type})`, async () => {
    const f = compressed(type);
    const { entry } = findL2Entry(f, (e) => (e & (1n << 62n)) !== 0n);
    const host = Number(entry & ((1n << 54n) - 1n));
    patch(f, host, Array.from({ length: 64 }, (_, i) => (i * 37 + 11) & 0xff));
    await expectFailure(f, { code: 'ECORRUPT', field: 'compressed cluster', offset: host, message: new RegExp(`compressed cluster at guest offset 0: ${type}`) });
  });
}

test('backing file loops: to itself, and through another image', async () => {
  const a = path.join(dir, 'loop-a.qcow2');
  const b = path.join(dir, 'loop-b.qcow2');
  create(a, MiB);
  create(b, MiB, { backing_file: 'loop-a.qcow2', backing_fmt: 'qcow2' });
  qemuImg('rebase', '-u', '-f', 'qcow2', '-b', 'loop-b.qcow2', '-F', 'qcow2', a);
  let err = await expectFailure(a, { code: 'ECORRUPT', field: 'backing_file', message: /backing file loop: .*loop-a\.qcow2 -> .*loop-b\.qcow2 -> .*loop-a\.qcow2/ });
  assert.is(err.location, a, 'the image met twice');
  const self = path.join(dir, 'loop-self.qcow2');
  create(self, MiB);
  qemuImg('rebase', '-u', '-f', 'qcow2', '-b', 'loop-self.qcow2', '-F', 'qcow2', self);
  err = await expectFailure(self, { code: 'ECORRUPT', field: 'backing_file', message: /backing file loop/ });
});

test('a backing chain deeper than the cap is refused, not followed', async () => {
  let prev = path.join(dir, 'deep-0.qcow2');
  create(prev, MiB);
  for (let i = 1; i <= 66; i++) {
    const next = path.join(dir, `deep-${i}.qcow2`);
    create(next, MiB, { backing_file: path.basename(prev), backing_fmt: 'qcow2' });
    prev = next;
  }
  await expectFailure(prev, { code: 'ENOTSUP', field: 'backing_file', message: /backing chain deeper than 64 images/ });
});

test('missing backing file', async () => {
  const base = create(path.join(dir, 'gone.qcow2'), MiB);
  const top = create(path.join(dir, 'orphan.qcow2'), MiB, { backing_file: 'gone.qcow2', backing_fmt: 'qcow2' });
  fs.rmSync(base);
  const err = await expectFailure(top, { code: 'ENOENT', field: 'backing_file', message: /cannot open backing file "gone\.qcow2"/ });
  assert.is(err.location, top);
});

test('missing external data file', async () => {
  const data = path.join(dir, 'gone.data');
  const f = create(path.join(dir, 'nodata.qcow2'), MiB, { data_file: data });
  fs.rmSync(data);
  await expectFailure(f, { code: 'ENOENT', field: 'data_file', message: /cannot open data file/ });
});

test('unknown incompatible feature bit, named from the feature name table', async () => {
  const f = valid();
  patch(f, 72, u64(1 << 7));
  await expectFailure(f, { code: 'ENOTSUP', field: 'incompatible_features', message: /unsupported qcow2 feature: bit 7 \(known/ });
  // Rename the table's entry for incompatible bit 0 into one for bit 7.
  const head = readBytes(f, 0, 4096);
  const entry = head.indexOf(Buffer.from('dirty bit'));
  assert.ok(entry > 0, 'qemu-img wrote a feature name table');
  patch(f, entry - 1, [7]);
  await expectFailure(f, { code: 'ENOTSUP', field: 'incompatible_features', message: /unsupported qcow2 feature: bit 7 "dirty bit"/ });
});

test('the corrupt bit: readable with a warning, writes refused', async () => {
  const f = valid();
  patch(f, 72, u64(2));
  const ref = path.join(dir, 'corrupt.raw');
  qemuImg('convert', '-O', 'raw', f, ref);
  const { reg } = spyRegistry();
  const img = (await reg.open(f, { readOnly: true })) as Qcow2Backend;
  try {
    assert.ok(img.warnings.some((w) => /marked corrupt/.test(w)));
    assert.ok(Buffer.from(await readWhole(img)).equals(fs.readFileSync(ref)));
    const info = (await img.info()) as { 'format-specific': { data: { corrupt: boolean } } };
    assert.is(info['format-specific'].data.corrupt, true);
    const err = await blockError(img.write(0, new Uint8Array(512)));
    assert.is(err.code, 'EROFS');
    assert.match(err.message, /marked corrupt; writing is refused/);
  } finally {
    await img.close();
  }
});

test('extended L2: subclusters both allocated and zero', async () => {
  const f = create(path.join(dir, 'bad-el2.qcow2'), MiB, { extended_l2: true });
  qemuIo(f, ['write -P 1 0 4k']);
  const { at } = findL2Entry(f, (e) => e !== 0n);
  patch(f, at + 8, [0, 0, 0, 1, 0, 0, 0, 1]); // zero bit 0 and allocation bit 0
  await expectFailure(f, { code: 'ECORRUPT', field: 'L2 entry', offset: at + 8, message: /both allocated and zero/ });
});

test('header fields: magic, version, encryption, refcount_order, extensions, names, snapshot table', async () => {
  const cases: Array<[number, number[], Expect]> = [
    [0, [0x51, 0x46, 0x49, 0xfc], { code: 'ECORRUPT', field: 'magic', message: /bad magic/ }],
    [4, u32(4), { code: 'ENOTSUP', field: 'version', message: /version 4 is not supported/ }],
    [32, u32(1), { code: 'ENOTSUP', field: 'crypt_method', message: /encrypted qcow2 images \(AES\)/ }],
    [32, u32(9), { code: 'ECORRUPT', field: 'crypt_method', offset: 32 }],
    [96, u32(7), { code: 'ECORRUPT', field: 'refcount_order', offset: 96 }],
    [104, [1], { code: 'ECORRUPT', field: 'incompatible_features', message: /compression type feature bit is clear/ }],
    [16, u32(2000), { code: 'ECORRUPT', field: 'backing_file_size', offset: 16 }],
    [56, u32(0), { code: 'ECORRUPT', field: 'refcount_table_clusters', offset: 56 }],
    [48, u64(3 * 512), { code: 'ECORRUPT', field: 'refcount_table_offset', offset: 48 }],
    [24, u64(2 ** 60), { code: 'ENOTSUP', field: 'size' }],
  ];
  for (const [at, bytes, e] of cases) {
    const f = valid();
    if (at === 16) patch(f, 8, u64(1024)); // a backing file name whose size is then too large
    patch(f, at, bytes);
    await expectFailure(f, e);
  }
  // A header extension whose length runs past the header area.
  const f = valid();
  const h = readBytes(f, 0, 112);
  patch(f, h.readUInt32BE(100) + 4, u32(0x10_0000));
  await expectFailure(f, { code: 'ECORRUPT', field: 'header extension', offset: h.readUInt32BE(100), message: /running past the end of the header area/ });
  // Snapshot table: pointing past the end of the file, then an entry running past it.
  const s = valid();
  qemuImg('snapshot', '-c', 'one', s);
  const snapAt = headerOf(s).snapshotsOffset;
  patch(s, 64, u64(fs.statSync(s).size + 64 * KiB));
  await expectFailure(s, { code: 'ECORRUPT', field: 'snapshots_offset', offset: 64 });
  patch(s, 64, u64(snapAt));
  patch(s, snapAt + 14, [0xff, 0xff]); // name_size 65535
  await expectFailure(s, { code: 'ECORRUPT', field: 'snapshot table', message: /snapshot 0: entry at \d+ runs past the end of the file/ });
});

test('an unknown snapshot is a clear error listing the ones there are', async () => {
  const f = valid();
  qemuImg('snapshot', '-c', 'present', f);
  const err = await expectFailure(f, { code: 'ENOENT', field: 'snapshot', message: /no snapshot absent in the image \(snapshots: 1 "present"\)/ }, { snapshot: 'absent' });
  assert.ok(err instanceof BlockError);
});

test.run();
