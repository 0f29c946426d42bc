/** Failures come back as BlockErrors with a code, the operation, location and offset. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError, DriverRegistry, gateBackend } from '@blockconv/core';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createFile, drivers, fileDriver, openFile, rawDriver } from '../src/index.js';
import { canMount, diskTempDir, filled, isRoot, rejects, removeDir, scratchMount } from './helpers.js';

const MiB = 1024 * 1024;
let dir = '';

test.before(() => {
  dir = diskTempDir();
  fs.chmodSync(dir, 0o755); // searchable by the unprivileged user of the EACCES test
});
test.after(() => removeDir(dir));

test('ENOENT on open and on create in a missing directory', async () => {
  const f = path.join(dir, 'missing.img');
  const err = await rejects(() => openFile(f), { code: 'ENOENT', op: 'open', location: f });
  assert.instance(err, BlockError);
  assert.match(err.message, /no such file/);
  await rejects(() => createFile(path.join(dir, 'nodir', 'x.img'), MiB), { code: 'ENOENT', op: 'create' });
});

test('EACCES on a file the user may not open', async () => {
  const f = path.join(dir, 'secret.img');
  fs.writeFileSync(f, filled(4096, 1));
  fs.chmodSync(f, 0o600);
  if (!isRoot) {
    fs.chmodSync(f, 0o000);
    await rejects(() => openFile(f), { code: 'EACCES', op: 'open', location: f });
    return;
  }
  // Root passes permission checks; drop the effective uid (for all threads, so the
  // thread-pool open sees it too) and restore it afterwards.
  process.seteuid!(65534);
  try {
    await rejects(() => openFile(f, { readOnly: true }), { code: 'EACCES', op: 'open', location: f });
    await rejects(() => createFile(f, 4096), { code: 'EACCES', op: 'create', location: f });
  } finally {
    process.seteuid!(0);
  }
});

test('a directory is refused, read-write or read-only', async () => {
  await rejects(() => openFile(dir), { code: 'EISDIR', op: 'open' });
  await rejects(() => openFile(dir, { readOnly: true }), { code: 'EISDIR', op: 'open' });
  await rejects(() => createFile(dir, MiB), { code: 'EISDIR', op: 'create' });
});

test('a character device is not an image', async () => {
  await rejects(() => openFile('/dev/null'), { code: 'EINVAL', op: 'open', location: '/dev/null' });
});

test("read-only backends refuse writes with EROFS (the core's gate, as the registry opens them)", async () => {
  const f = path.join(dir, 'ro.img');
  await createFile(f, MiB);
  const img = gateBackend(await fileDriver.open(f, { readOnly: true }));
  assert.ok(img.readOnly);
  await rejects(() => img.write(0, filled(512, 1)), { code: 'EROFS', op: 'write', offset: 0 });
  await rejects(() => img.writeZeroes(512, 512), { code: 'EROFS', op: 'writeZeroes', offset: 512 });
  await rejects(() => img.discard(0, 512), { code: 'EROFS', op: 'discard' });
  await img.flush(); // nothing to flush, and no error
  assert.is((await img.read(0, 4)).length, 4);
  await img.close();

  // raw opened read-only on a writable file refuses too, and the file is untouched.
  const file = gateBackend(await fileDriver.open(f, {}));
  const raw = gateBackend(await rawDriver.open(file, { readOnly: true }));
  assert.ok(raw.readOnly);
  await rejects(() => raw.write(0, filled(512, 1)), { code: 'EROFS', op: 'write' });
  await rejects(() => raw.writeZeroes(0, 512), { code: 'EROFS' });
  await rejects(() => raw.discard(0, 512), { code: 'EROFS' });
  await raw.close();
  assert.is(fs.statSync(f).blocks, 0);
});

test('the registry reports open errors with the location', async () => {
  const reg = new DriverRegistry().register(...drivers);
  const f = path.join(dir, 'nope.img');
  await rejects(() => reg.open(f), { code: 'ENOENT', location: f });
});

(canMount ? test : test.skip)('ENOSPC on a full file system names the offset', async () => {
  const m = scratchMount('tmpfs', 'size=1m')!;
  try {
    const f = path.join(m.dir, 'full.img');
    await createFile(f, 4 * MiB); // sparse, so it fits
    const img = await openFile(f);
    await img.write(0, filled(512 * 1024, 1));
    const err = await rejects(() => img.write(2 * MiB, filled(MiB, 2)), {
      name: 'BlockError',
      code: 'ENOSPC',
      op: 'write',
      offset: 2 * MiB,
      length: MiB,
      location: f,
    });
    assert.match(err.message, /no space left on device/);
    assert.match(err.message, new RegExp(`at offset ${2 * MiB}`));
    assert.is((err.cause as NodeJS.ErrnoException).code, 'ENOSPC');
    // Zeroing without unmap must allocate, so it fails the same way.
    await rejects(() => img.writeZeroes(MiB, 2 * MiB), { code: 'ENOSPC', op: 'writeZeroes', offset: MiB });
    // Punching frees space, so writes work again.
    await img.writeZeroes(0, 4 * MiB, { mayUnmap: true });
    await img.write(3 * MiB, filled(256 * 1024, 3));
    await img.close();
  } finally {
    m.unmount();
  }
});

test.run();
