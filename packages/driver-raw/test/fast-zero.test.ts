/**
 * Fast zero on files (canFastZero): fallocate punches or zeroes the range, and a file
 * system with neither answers ENOTSUP with nothing changed instead of writing zeroes.
 * Convert into an existing file therefore zeroes it whole first and writes only the
 * data, as qemu-img convert -n does; block devices (BLKZEROOUT may write) do not claim it.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { DriverRegistry, convert, type BlockError } from '@blockconv/core';
import { drivers } from '../src/index.js';
import {
  attachLoop,
  canLoop,
  canMount,
  dataBytes,
  diskTempDir,
  identical,
  removeDir,
  scratchMount,
} from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir = '';
const reg = new DriverRegistry().register(...drivers);

test.before(() => {
  dir = diskTempDir('blockconv-fastzero-');
});
test.after(() => removeDir(dir));

/** 8 MiB sparse raw source: two data runs, holes elsewhere. */
function makeSource(at: string): string {
  const file = path.join(at, 'src.raw');
  execFileSync('truncate', ['-s', String(8 * MiB), file]);
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, randomBytes(MiB), 0, MiB, 0);
  fs.writeSync(fd, randomBytes(512 * KiB), 0, 512 * KiB, 5 * MiB);
  fs.closeSync(fd);
  return file;
}

test('a file zeroes fast: the range becomes a hole, with or without unmapping', async () => {
  const f = path.join(dir, 'fast.raw');
  fs.writeFileSync(f, Buffer.alloc(4 * MiB, 0x5a));
  const img = await reg.open(f, { format: 'raw' });
  try {
    assert.is(img.canFastZero, true);
    await img.writeZeroes(0, 2 * MiB, { mayUnmap: true, fast: true });
    await img.writeZeroes(2 * MiB, MiB, { fast: true }); // NO_HOLE: ZERO_RANGE keeps it allocated
    const back = await img.read(0, 4 * MiB);
    assert.ok(back.subarray(0, 3 * MiB).every((b) => b === 0));
    assert.ok(back.subarray(3 * MiB).every((b) => b === 0x5a));
  } finally {
    await img.close();
  }
  assert.ok((await dataBytes(f)) <= 2 * MiB, 'the unmapped range is a hole');
});

test('convert into an existing file with old data: zeroed whole first, then only the data written', async () => {
  const source = makeSource(dir);
  const target = path.join(dir, 'old.raw');
  fs.writeFileSync(target, Buffer.alloc(8 * MiB, 0x77));
  const src = await reg.open(source, { readOnly: true, format: 'raw' });
  const dst = await reg.open(target, { format: 'raw' });
  try {
    const r = await convert({ sources: [src], target: dst });
    assert.is(r.preZeroed, true);
    assert.is(r.bytesZeroed, 0, 'no zero extent written one by one');
    assert.is(r.bytesWritten, MiB + 512 * KiB);
  } finally {
    await src.close();
    await dst.close();
  }
  identical(source, target);
  assert.is(await dataBytes(target), MiB + 512 * KiB, "the old data outside the source's is gone, as holes");
});

(canMount ? test : test.skip)(
  'a file system without fallocate (ramfs): a fast zero is ENOTSUP and changes nothing; convert writes zeroes instead',
  async () => {
    const m = scratchMount('ramfs')!;
    try {
      const f = path.join(m.dir, 'slow.raw');
      fs.writeFileSync(f, Buffer.alloc(MiB, 0x33));
      const img = await reg.open(f, { format: 'raw' });
      try {
        const err = (await img
          .writeZeroes(0, MiB, { mayUnmap: true, fast: true })
          .catch((e: unknown) => e)) as BlockError;
        assert.is(err.code, 'ENOTSUP', String(err));
        assert.is(err.op, 'writeZeroes');
        assert.ok(
          (await img.read(0, MiB)).every((b) => b === 0x33),
          'nothing changed',
        );
      } finally {
        await img.close();
      }
      const source = makeSource(dir);
      const target = path.join(m.dir, 'old.raw');
      fs.writeFileSync(target, Buffer.alloc(8 * MiB, 0x77));
      const src = await reg.open(source, { readOnly: true, format: 'raw' });
      const dst = await reg.open(target, { format: 'raw' });
      try {
        const r = await convert({ sources: [src], target: dst });
        assert.is(r.preZeroed, undefined);
        assert.ok(r.bytesWritten + r.bytesZeroed >= 8 * MiB - MiB - 512 * KiB, 'zero extents written');
      } finally {
        await src.close();
        await dst.close();
      }
      identical(source, target);
    } finally {
      m.unmount();
    }
  },
);

(canLoop ? test : test.skip)('a block device does not claim fast zero (BLKZEROOUT may write)', async () => {
  const backing = path.join(dir, 'dev.img');
  fs.writeFileSync(backing, Buffer.alloc(4 * MiB));
  const loop = attachLoop(backing)!;
  try {
    const dev = await reg.open(loop.dev, { format: 'raw' });
    try {
      assert.is(dev.canFastZero, false);
      const err = (await dev.writeZeroes(0, MiB, { fast: true }).catch((e: unknown) => e)) as BlockError;
      assert.is(err.code, 'ENOTSUP', 'the gate refuses it');
    } finally {
      await dev.close();
    }
  } finally {
    loop.detach();
  }
});

test.run();
