/**
 * Backing-chain hostility: which backing and data files an image may make us open (the
 * "references" open option), and huge virtual sizes. Loops and chains deeper than the
 * cap are in corrupt-images.ts.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { type BlockError, mapImage } from '@blockconv/core';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { MiB, TiB, blockError, cli, create, qemuImg, qemuIo, registry, removeDir, tempDir } from './helpers.js';

const test = suite('references and hostile chains');
let dir = '';
let images = '';
let outside = '';
test.before(() => {
  dir = tempDir('blockconv-refs-');
  images = path.join(dir, 'images');
  outside = path.join(dir, 'elsewhere');
  fs.mkdirSync(path.join(images, 'sub'), { recursive: true });
  fs.mkdirSync(outside);
  // What a hostile image would like to copy out: a file outside the image's directory.
  fs.writeFileSync(path.join(outside, 'secret.raw'), Buffer.alloc(MiB, 0x5e));
  fs.writeFileSync(path.join(images, 'sub', 'base.raw'), Buffer.alloc(MiB, 0x11));
});
test.after(() => removeDir(dir));

function overlay(name: string, backing: string, fmt = 'raw'): string {
  const f = path.join(images, name);
  qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', backing, '-F', fmt, f, String(MiB));
  return f;
}

async function opens(image: string, options: Record<string, string> = {}): Promise<Uint8Array> {
  const img = await registry().open(image, { format: 'qcow2', readOnly: true, options });
  try {
    return await img.read(0, 4096);
  } finally {
    await img.close();
  }
}

async function refused(image: string, options: Record<string, string>, message: RegExp): Promise<BlockError> {
  const err = await blockError(opens(image, options));
  assert.is(err.code, 'EACCES', err.message);
  assert.match(err.message, message);
  assert.ok(!err.message.includes('\n'));
  return err;
}

test("same-server (the default) follows local names anywhere; confined only inside the image's directory", async () => {
  const escaping = overlay('escaping.qcow2', '../elsewhere/secret.raw');
  const absolute = overlay('absolute.qcow2', path.join(outside, 'secret.raw'));
  const inside = overlay('inside.qcow2', 'sub/base.raw');
  assert.is((await opens(escaping))[0], 0x5e);
  assert.is((await opens(absolute))[0], 0x5e);
  assert.is((await opens(inside, { references: 'confined' }))[0], 0x11);
  const err = await refused(
    escaping,
    { references: 'confined' },
    /backing file "\.\.\/elsewhere\/secret\.raw" resolves to .*elsewhere\/secret\.raw, outside the image's directory .*images\/: refused by references=confined; the open option references=any follows it/,
  );
  assert.is(err.field, 'backing_file');
  await refused(absolute, { references: 'confined' }, /outside the image's directory/);
  await refused(
    inside,
    { references: 'none' },
    /backing file "sub\/base\.raw" is named by the image: refused by references=none/,
  );
  assert.is((await opens(escaping, { references: 'any' }))[0], 0x5e);
});

test('confined: a symlink inside the directory that points out of it is outside', async () => {
  fs.symlinkSync(path.join(outside, 'secret.raw'), path.join(images, 'link.raw'));
  const viaLink = overlay('via-link.qcow2', 'link.raw');
  await refused(viaLink, { references: 'confined' }, /resolves to .*elsewhere\/secret\.raw, outside/);
});

test('a local image naming a network server is refused by default, before any connection', async () => {
  const remote = overlay('remote.qcow2', 'nfs://198.18.0.99/export/base.raw');
  await refused(
    remote,
    {},
    /backing file "nfs:\/\/198\.18\.0\.99\/export\/base\.raw" is on nfs:\/\/198\.18\.0\.99, not on the image's storage \(this machine\): refused by references=same-server \(the default\)/,
  );
  const iscsi = overlay('remote-lun.qcow2', 'iscsi://198.18.0.99/iqn.2026-11.x:y/1');
  await refused(iscsi, {}, /is on iscsi:\/\/198\.18\.0\.99/);
});

test('the policy holds down the chain: a confined top image cannot reach out through its backing file', async () => {
  const mid = path.join(images, 'mid.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', '../elsewhere/secret.raw', '-F', 'raw', mid, String(MiB));
  const top = overlay('top.qcow2', 'mid.qcow2', 'qcow2');
  assert.is((await opens(top))[0], 0x5e);
  await refused(
    top,
    { references: 'confined' },
    /backing file "\.\.\/elsewhere\/secret\.raw" resolves to .*outside the image's directory/,
  );
});

test("data files: one the image names is checked, one the user names is the user's choice", async () => {
  const img = path.join(images, 'ext.qcow2');
  create(img, MiB, { data_file: path.join(outside, 'ext.data'), data_file_raw: true });
  qemuIo(img, ['write -P 0x77 0 64k']);
  assert.is((await opens(img))[0], 0x77);
  const err = await refused(
    img,
    { references: 'confined' },
    /data file ".*ext\.data" resolves to .*outside the image's directory/,
  );
  assert.is(err.field, 'data_file');
  assert.is((await opens(img, { references: 'confined', 'data-file': path.join(outside, 'ext.data') }))[0], 0x77);
});

test('check honours the policy; a bad value is refused naming the option', async () => {
  const escaping = path.join(images, 'escaping.qcow2');
  const err = await blockError(registry().check(escaping, { format: 'qcow2', options: { references: 'confined' } }));
  assert.is(err.code, 'EACCES');
  assert.is((await registry().check(escaping, { format: 'qcow2' })).corruptions, 0);
  const bad = await blockError(opens(escaping, { references: 'sometimes' }));
  assert.is(bad.code, 'EINVAL');
  assert.is(bad.field, 'references');
  assert.match(bad.message, /references must be one of same-server, confined, none, any, got "sometimes"/);
});

test('the command: one line naming the policy, exit 1', () => {
  const r = cli(
    'convert',
    '-O',
    'raw',
    '--source-opts',
    'references=confined',
    path.join(images, 'escaping.qcow2'),
    path.join(dir, 'out.raw'),
  );
  assert.is(r.status, 1, r.stderr);
  assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /^blockconv: .*refused by references=confined/, r.stderr);
});

test('a huge virtual size costs what its metadata costs: 8 TiB of holes opens, maps and converts at once', async () => {
  const big = path.join(images, 'big.qcow2');
  create(big, 8 * TiB);
  qemuIo(big, ['write -P 0x42 4T 64k']);
  const reg = registry();
  const img = await reg.open(big, { format: 'qcow2', readOnly: true });
  try {
    let entries = 0;
    for await (const e of mapImage(img)) {
      entries++;
      assert.ok(e.length > 0);
    }
    assert.ok(entries <= 4, `${entries} map entries`);
  } finally {
    await img.close();
  }
  const out = path.join(dir, 'big.raw');
  const r = cli('convert', '-O', 'raw', big, out);
  assert.is(r.status, 0, r.stderr);
  assert.is(fs.statSync(out).size, 8 * TiB);
  // Sparse: only the data was written.
  assert.ok(fs.statSync(out).blocks * 512 < 64 * MiB);
  assert.is(qemuImg('compare', '-q', '-f', 'qcow2', '-F', 'raw', big, out), '');
  fs.rmSync(out);
});

test.run();
