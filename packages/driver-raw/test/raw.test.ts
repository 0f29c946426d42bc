/** The raw format, the registry round trip, and block status against qemu-img map. */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DriverRegistry } from '@blockconv/core';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import defaultDrivers, { createFile, drivers, fileDriver, openFile, rawDriver } from '../src/index.js';
import { diskTempDir, extents, filled, hasQemuImg, removeDir } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir = '';

test.before(() => {
  dir = diskTempDir();
});
test.after(() => removeDir(dir));

test('exports', () => {
  assert.equal(drivers, [fileDriver, rawDriver]);
  assert.is(defaultDrivers, drivers);
  assert.is(rawDriver.kind, 'format');
  assert.is(rawDriver.name, 'raw');
  assert.is(rawDriver.probe!(new Uint8Array(4096), 'x'), 1);
  assert.is(rawDriver.protocolSizeFor!(12345, {}), 12345);
});

test('raw passes everything through and reports itself as raw', async () => {
  const f = path.join(dir, 'pass.img');
  await createFile(f, 2 * MiB);
  const file = await openFile(f, { cache: 'none' });
  const raw = await rawDriver.open(file, {});
  assert.is(raw.driverName, 'raw');
  assert.is(raw.size, file.size);
  assert.is(raw.location, f);
  assert.is(raw.limits, file.limits);
  assert.ok(raw.canBlockStatus && raw.canZero);
  assert.type(raw.allocBuffer, 'function');
  const buf = raw.allocBuffer!(4096).fill(8);
  await raw.write(4096, buf);
  assert.is((await raw.read(4096, 4096, raw.allocBuffer!(4096)))[4095], 8);
  assert.equal(await raw.blockStatus(0, 2 * MiB), { kind: 'zero', length: 4096, offset: 0 });
  assert.is(await raw.allocatedSize!(), 4096);
  assert.equal(await raw.info!(), {});
  await raw.flush();
  await raw.close();
  // Buffered files have no allocBuffer, and neither has raw on top of them.
  const plain = await rawDriver.open(await openFile(f), {});
  assert.is(plain.allocBuffer, undefined);
  await plain.close();
});

test('registry: create, open by probing, and plain paths or file:// URLs', async () => {
  const reg = new DriverRegistry().register(...drivers);
  const f = path.join(dir, 'reg.img');
  fs.writeFileSync(f, filled(MiB, 1)); // replaced by create
  const img = await reg.create(f, 3 * MiB);
  assert.is(img.driverName, 'raw');
  assert.is(img.size, 3 * MiB);
  assert.ok(img.zeroInitialized);
  await img.write(MiB, filled(MiB, 7));
  await img.close();
  const again = await reg.open(`file://${f}`);
  assert.is(again.driverName, 'raw');
  assert.not.ok(again.zeroInitialized);
  assert.equal(await extents(again), [
    { start: 0, length: MiB, kind: 'zero' },
    { start: MiB, length: MiB, kind: 'data' },
    { start: 2 * MiB, length: MiB, kind: 'zero' },
  ]);
  await again.close();
});

(hasQemuImg ? test : test.skip)('block status agrees with qemu-img map', async () => {
  const f = path.join(dir, 'map.img');
  await createFile(f, 64 * MiB + 3 * KiB);
  const img = await openFile(f);
  await img.write(0, filled(4 * KiB, 1));
  await img.write(MiB, filled(64 * KiB, 2));
  await img.write(5 * MiB + 12 * KiB, filled(300 * KiB, 3));
  await img.write(20 * MiB, filled(8 * MiB, 4));
  await img.writeZeroes(22 * MiB, MiB, { mayUnmap: true });
  await img.write(64 * MiB, filled(3 * KiB, 5));
  await img.flush();
  const ours = await extents(img);
  await img.close();

  type QemuExtent = { start: number; length: number; zero: boolean; data: boolean };
  const map = JSON.parse(
    execFileSync('qemu-img', ['map', '--output=json', '-f', 'raw', f], { encoding: 'utf8' }),
  ) as QemuExtent[];
  const theirs: Array<{ start: number; length: number; kind: string }> = [];
  for (const e of map) {
    const kind = e.data ? 'data' : 'zero';
    const last = theirs[theirs.length - 1];
    if (last && last.kind === kind) last.length += e.length;
    else theirs.push({ start: e.start, length: e.length, kind });
  }
  assert.equal(ours, theirs);
  assert.ok(ours.length >= 9, JSON.stringify(ours));
});

test.run();
