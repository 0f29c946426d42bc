// Bad input and faults give a BlockError with a code and a clear one-line message,
// within a bounded time.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { BlockError, DriverRegistry, convert, gateBackend } from '@blockconv/core';
import { drivers as raw } from '@blockconv/driver-raw';
import { drivers as iscsi, openIscsi, parseIscsiUrl } from '../../src/index.js';
import { CHAP_USER, IQN, LUNS, PORTAL, chapPassword, ensureServer, failure, iscsiProxy, wipeLun } from '../helpers.js';

ensureServer();
const test = suite('iscsi errors');

async function openError(url: string, options = {}, env: Record<string, string> = {}): Promise<BlockError> {
  const saved = { ...process.env };
  Object.assign(process.env, env);
  try {
    const e = await failure(() => openIscsi(url, options));
    assert.instance(e, BlockError, String(e));
    assert.not.match(e.message, /\n/, 'one line');
    return e as BlockError;
  } finally {
    for (const k of Object.keys(env))
      if (saved[k] === undefined) delete process.env[k];
      else process.env[k] = saved[k];
  }
}

test('URLs: parsed as qemu writes them, and the password never shows', () => {
  const u = parseIscsiUrl('iscsi://alice%s3cret@[::1]:3261/iqn.2026-11.x:y/7');
  assert.equal(
    [u.host, u.port, u.target, u.lun, u.user, u.password],
    ['::1', 3261, 'iqn.2026-11.x:y', 7, 'alice', 's3cret'],
  );
  assert.is(u.display, 'iscsi://alice@[::1]:3261/iqn.2026-11.x:y/7');
  assert.is(parseIscsiUrl(`iscsi://127.0.0.1/${IQN}:disk512/1`).port, 3260);
  for (const bad of [
    'iscsi://h/iqn',
    'iscsi://h/iqn/x',
    'iscsi:///iqn/1',
    'iscsi://h:99999/iqn/1',
    'iscsi://a%pw@h/iqn/lun1',
  ]) {
    try {
      parseIscsiUrl(bad);
      assert.unreachable(bad);
    } catch (err) {
      assert.instance(err, BlockError);
      assert.is((err as BlockError).code, 'EINVAL');
      assert.not.match((err as Error).message, /pw/);
    }
  }
});

test('no such target, no such LUN, nothing listening, unknown host', async () => {
  let e = await openError(`iscsi://${PORTAL}/${IQN}:no-such-target/1`);
  assert.is(e.code, 'ENOENT', e.message);
  assert.match(e.message, /no such target/);
  e = await openError(`iscsi://${PORTAL}/${IQN}:disk512/9`);
  assert.is(e.code, 'ENOENT', e.message);
  assert.match(e.message, /no such LUN/);
  e = await openError(`iscsi://127.0.0.1:1/${IQN}:disk512/1`);
  assert.is(e.code, 'ECONNREFUSED', e.message);
  e = await openError(`iscsi://no-such-host.invalid/${IQN}:disk512/1`);
  assert.is(e.code, 'ENOTFOUND', e.message);
});

test('CHAP: a user without a password, a wrong password, an unreadable password file', async () => {
  const url = LUNS.chap.url;
  const password = chapPassword();
  let e = await openError(url, {}, { LIBISCSI_CHAP_USERNAME: CHAP_USER });
  assert.is(e.code, 'EACCES');
  assert.match(e.message, /no password: set LIBISCSI_CHAP_PASSWORD or BLOCKCONV_ISCSI_PASSWORD_FILE/);
  e = await openError(url.replace('iscsi://', `iscsi://${CHAP_USER}%${password}x@`));
  assert.is(e.code, 'EACCES');
  assert.match(e.message, /CHAP authentication failed/);
  assert.not.ok(e.message.includes(password) || String((e as { cause?: unknown }).cause).includes(password));
  e = await openError(url, { options: { user: CHAP_USER, 'password-file': '/nonexistent/pw' } });
  assert.is(e.code, 'EACCES');
  assert.match(e.message, /cannot read the CHAP password file/);
  const ok = await openIscsi(url.replace('iscsi://', `iscsi://${CHAP_USER}%${password}@`));
  assert.not.ok(ok.location.includes(password), ok.location);
  assert.is(ok.location, url.replace('iscsi://', `iscsi://${CHAP_USER}@`));
  await ok.close();
});

test("unaligned requests are padded by the core's gate: reads bounce, writes read-modify-write", async () => {
  const b512 = gateBackend(await openIscsi(LUNS.disk512.url));
  const b4k = gateBackend(await openIscsi(LUNS.disk4k.url));
  try {
    assert.is(b4k.limits.requestAlignment, 4096);
    assert.is(b512.limits.requestAlignment, 512);
    for (const b of [b512, b4k]) {
      const block = b.limits.requestAlignment;
      const base = new Uint8Array(4 * block).fill(7);
      await b.write(0, base);
      // Odd offsets and lengths, the last byte of the LUN among them.
      for (const [off, len] of [
        [100, 512],
        [1, 1000],
        [block - 3, 6],
        [block * 3 + 1, block - 1],
      ] as const) {
        const data = new Uint8Array(len).map((_, i) => (off + i) & 0xff);
        await b.write(off, data);
        base.set(data, off);
      }
      const got = await b.read(0, 4 * block);
      assert.ok(Buffer.from(got).equals(Buffer.from(base)), `${block}-byte blocks: content as written`);
      assert.ok(
        Buffer.from(await b.read(101, 37)).equals(Buffer.from(base.subarray(101, 138))),
        `${block}-byte blocks: an unaligned read`,
      );
      await b.write(b.size - 1, Uint8Array.of(9));
      assert.is((await b.read(b.size - 1, 1))[0], 9, `${block}-byte blocks: the last byte`);
    }
  } finally {
    await Promise.all([b512.close(), b4k.close()]);
  }
});

test('what a thin LUN reports: limits, block status, zeroes only when wholly deallocated', async () => {
  const lun = LUNS.disk512;
  wipeLun(lun.file);
  let b = await openIscsi(lun.url);
  assert.ok(b.canBlockStatus && b.canDiscard && b.canZero);
  assert.ok(b.zeroInitialized, 'wholly deallocated LUN reads zeroes');
  assert.equal(await b.blockStatus(0, 4096), { kind: 'zero', length: lun.size });
  await b.write(8192, new Uint8Array(4096).fill(1));
  assert.equal(await b.blockStatus(0, 4096), { kind: 'zero', length: 8192 });
  assert.equal(await b.blockStatus(8192, 4096), { kind: 'data', length: 4096 });
  await b.close();
  b = await openIscsi(lun.url);
  assert.not.ok(b.zeroInitialized, 'a LUN holding data does not claim to read zeroes');
  await b.discard(8192, 4096);
  assert.is((await b.blockStatus(8192, 4096)).kind, 'zero');
  await b.close();
  const ro = gateBackend(await openIscsi(lun.url, { readOnly: true }));
  assert.is((await failure(() => ro.writeZeroes(0, 512))).code, 'EROFS');
  await ro.close();
});

test('block status of a fragmented LUN: one GET LBA STATUS answers hundreds of extents', async () => {
  const lun = LUNS.disk512;
  wipeLun(lun.file);
  const fd = fs.openSync(lun.file, 'r+');
  for (let i = 0; i < 300; i++) fs.writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, i * 65536);
  fs.closeSync(fd);
  const b = await openIscsi(lun.url, { readOnly: true });
  try {
    let pos = 0;
    const kinds: string[] = [];
    while (pos < b.size) {
      const e = await b.blockStatus(pos, b.size - pos);
      kinds.push(e.kind);
      pos += e.length;
    }
    assert.is(kinds.length, 600, 'data and hole alternate');
    assert.is(kinds.filter((k) => k === 'data').length, 300);
    assert.is(b.stats.lbaStatusRequests, 1);
  } finally {
    await b.close();
  }
});

test('target gone mid-transfer: the convert fails with a clear error within a bounded time', async () => {
  const lun = LUNS.disk512;
  wipeLun(lun.file);
  const fd = fs.openSync(lun.file, 'r+');
  fs.writeSync(fd, Buffer.alloc(lun.size, 0x33), 0, lun.size, 0);
  fs.closeSync(fd);
  const proxy = await iscsiProxy();
  const dir = fs.mkdtempSync('/var/tmp/blockconv-iscsi-test-');
  const registry = new DriverRegistry().register(...raw, ...iscsi);
  const url = `iscsi://${proxy.portal}/${IQN}:disk512/1`;
  const source = await registry.open(url, { readOnly: true, format: 'raw', options: { timeout: '3' } });
  const target = await registry.create(path.join(dir, 'out.raw'), source.size, { format: 'raw' });
  try {
    let killedAt = 0;
    const job = convert({
      sources: [source],
      target,
      workers: 8,
      bufferSize: 256 * 1024,
      rateLimit: 16 * 1024 * 1024,
      onProgress: (p) => {
        if (!killedAt && p.bytesRead > 0) {
          killedAt = Date.now();
          proxy.kill();
        }
      },
    });
    const e = await failure(() => job);
    const elapsed = Date.now() - (killedAt || Date.now());
    assert.ok(killedAt > 0, 'the target went away mid-transfer');
    assert.instance(e, BlockError, String(e));
    assert.ok(['ECONNRESET', 'ETIMEDOUT'].includes(e.code!), `${e.code}: ${e.message}`);
    // The session tries to reconnect (a restarted target is ridden through) until the
    // timeout finds that nothing moves.
    assert.match(
      e.message,
      /iSCSI connection lost|did not answer in time|no answer from the iSCSI target 127\.0\.0\.1:\d+ for 3 s/,
    );
    assert.match(e.message, /iscsi:\/\/127\.0\.0\.1:\d+\/iqn\.2026-11\.org\.blockconv:disk512\/1 read/);
    assert.ok(elapsed < 8000, `failed ${elapsed} ms after the target went away`);
  } finally {
    proxy.kill();
    await Promise.all([source.close(), target.close()]).catch(() => {});
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a hung target: requests fail with ETIMEDOUT after the timeout option', async () => {
  const proxy = await iscsiProxy();
  const b = await openIscsi(`iscsi://${proxy.portal}/${IQN}:disk512/1`, { options: { timeout: '2' } });
  try {
    proxy.freeze();
    const start = Date.now();
    const e = await failure(() => b.read(0, 65536));
    assert.is(e.code, 'ETIMEDOUT', e.message);
    assert.ok(Date.now() - start < 6000);
  } finally {
    proxy.kill();
    await b.close();
  }
});

test.run();
