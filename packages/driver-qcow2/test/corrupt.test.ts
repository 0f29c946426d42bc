/**
 * Damaged images (corrupt-images.ts), each made by patching bytes of a valid one:
 * reading every one gives a BlockError naming the field or table entry (and where it
 * is), and none makes the driver read outside a file or read much more than it holds.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError } from '@blockconv/core';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import type { Qcow2Backend } from '../src/index.js';
import { openFailures, valid, type Expect } from './corrupt-images.js';
import {
  MiB,
  blockError,
  patch,
  qemuImg,
  readAll,
  readWhole,
  removeDir,
  spyRegistry,
  tempDir,
  u32,
  u64,
} from './helpers.js';

const test = suite('corrupt images');
let dir = '';
test.before(() => {
  dir = tempDir();
});
test.after(() => removeDir(dir));

/** Opens and reads the whole image through a spying registry; it must fail as expected and stay inside the files. */
async function expectFailure(image: string, e: Expect, options: Record<string, string> = {}): Promise<BlockError> {
  const { reg, stats } = spyRegistry();
  const err = await blockError(
    (async () => {
      const img = await reg.open(image, { readOnly: true, format: 'qcow2', options });
      try {
        await readWhole(img);
        // Block status walks every table too.
        for (let pos = 0; pos < img.size; ) pos += (await img.blockStatus(pos, img.size - pos)).length;
      } finally {
        await img.close();
      }
    })(),
  );
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

for (const c of openFailures) {
  test(c.name, async () => {
    const { image, open } = c.make(dir);
    assert.ok(open, 'reading this image must fail');
    const err = await expectFailure(image, open);
    if (open.atImage) assert.is(err.location, image, 'the error names the image');
  });
}

test('l1_size larger than the virtual size needs, but inside the file: read as qemu does', async () => {
  // A few spare entries inside the file (as a shrunk image has) are fine and ignored.
  const f = valid(dir);
  patch(f, 36, u32(8));
  const ref = path.join(dir, 'l1.raw');
  qemuImg('convert', '-O', 'raw', f, ref);
  assert.ok(Buffer.from(await readAll(f)).equals(fs.readFileSync(ref)));
});

test('the corrupt bit: readable with a warning, writes refused', async () => {
  const f = valid(dir);
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

test('an unknown snapshot is a clear error listing the ones there are', async () => {
  const f = valid(dir);
  qemuImg('snapshot', '-c', 'present', f);
  const err = await expectFailure(
    f,
    { code: 'ENOENT', field: 'snapshot', message: /no snapshot absent in the image \(snapshots: 1 "present"\)/ },
    { snapshot: 'absent' },
  );
  assert.ok(err instanceof BlockError);
});

test.run();
