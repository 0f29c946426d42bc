// The binding against the real tgtd of tools/iscsi-server.sh.
import * as fs from 'node:fs';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { IscsiSession, type IscsiError } from '../../src/index.js';
import { CHAP_USER, IQN, LUNS, PORTAL, chapPassword, ensureServer, iscsiProxy, wipeLun } from '../server.js';

ensureServer();
const test = suite('libiscsi binding');
const lun = LUNS.binding;
const target = `${IQN}:disk512`;

async function session(options = {}): Promise<IscsiSession> {
  const s = new IscsiSession({ timeoutSec: 10, ...options });
  await s.login({ portal: PORTAL, target, lun: 3 });
  return s;
}

async function failure(p: Promise<unknown>): Promise<IscsiError> {
  try {
    await p;
  } catch (err) {
    return err as IscsiError;
  }
  throw new Error('expected a rejection');
}

test.before(() => wipeLun(lun.file));

test('capacity, inquiry and the VPD pages of a thin LUN', async () => {
  const s = await session();
  try {
    const cap = await s.readCapacity16();
    assert.equal([cap.lastLba + 1, cap.blockSize, cap.lbpme, cap.lbprz], [lun.size / 512, 512, true, true]);
    assert.is((await s.inquiry()).deviceType, 0);
    const pages = await s.supportedVpdPages();
    assert.ok(pages.includes(0xb0) && pages.includes(0xb2), String(pages));
    const bl = await s.blockLimits();
    assert.type(bl?.maxTransferBlocks, 'number');
    const lbp = await s.provisioning();
    assert.equal([lbp?.lbpu, lbp?.lbpws, lbp?.lbprz, lbp?.provisioningType], [true, true, true, 2]);
  } finally {
    await s.close();
  }
});

test("write, read back into the caller's buffer, WRITE SAME with UNMAP, UNMAP, GET LBA STATUS, flush", async () => {
  const s = await session();
  try {
    const data = Buffer.alloc(65536);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    await s.write16(2048, 512, data);
    const back = Buffer.alloc(65536);
    await s.read16(2048, 128, 512, back);
    assert.ok(back.equals(data));
    // Backing file agrees: the write went where the LBA says.
    const fd = fs.openSync(lun.file, 'r');
    const onDisk = Buffer.alloc(65536);
    fs.readSync(fd, onDisk, 0, 65536, 2048 * 512);
    fs.closeSync(fd);
    assert.ok(onDisk.equals(data));
    let st = await s.getLbaStatus(2048);
    assert.equal(st[0], { lba: 2048, blocks: 128, provisioning: 0 });
    await s.writeSame16(2048, 64, 512, true);
    await s.read16(2048, 128, 512, back);
    assert.ok(back.subarray(0, 32768).every((b) => b === 0) && back.subarray(32768).equals(data.subarray(32768)));
    await s.unmap(2048 + 64, 64);
    st = await s.getLbaStatus(2048);
    assert.is(st[0]!.provisioning, 1, JSON.stringify(st));
    await s.synchronizeCache16();
    assert.is(s.outstanding, 0);
  } finally {
    await s.close();
  }
});

test('many tasks are in flight at once on one session', async () => {
  const s = await session();
  try {
    const n = 32;
    const bufs = Array.from({ length: n }, () => Buffer.alloc(65536));
    const reads = bufs.map((b, i) => s.read16(i * 128, 128, 512, b));
    // Counted in the binding at submission: all of them are queued before any completes.
    assert.is(s.outstanding, n);
    await Promise.all(reads);
    assert.is(s.outstanding, 0);
    assert.ok(s.peakOutstanding >= n, `peak ${s.peakOutstanding}`);
  } finally {
    await s.close();
  }
});

test('destroy with tasks in flight rejects them with ECANCELED, and later calls with EBADF', async () => {
  const s = await session();
  const reads = Array.from({ length: 8 }, () => s.read16(0, 2048, 512, Buffer.alloc(1 << 20)));
  s.destroy();
  const results = await Promise.allSettled(reads);
  for (const r of results) {
    assert.is(r.status, 'rejected');
    assert.is(((r as PromiseRejectedResult).reason as IscsiError).code, 'ECANCELED');
  }
  assert.is(s.outstanding, 0);
  assert.is((await failure(s.read16(0, 1, 512, Buffer.alloc(512)))).code, 'EBADF');
  s.destroy(); // idempotent
});

test('SCSI errors carry the sense data, spelt out', async () => {
  const s = await session();
  try {
    const e = await failure(s.read16(lun.size / 512, 1, 512, Buffer.alloc(512)));
    assert.is(e.code, 'ERANGE');
    assert.equal([e.sense?.key, e.sense?.asc, e.sense?.ascq], [5, 0x21, 0]);
    assert.match(e.message, /READ\(16\): illegal request: logical block address out of range/);
  } finally {
    await s.close();
  }
});

test('login failures: no such target, no such LUN, nothing listening, wrong CHAP password', async () => {
  const password = chapPassword();
  const cases = [
    [{ portal: PORTAL, target: `${IQN}:no-such-target`, lun: 1 }, 'ENOENT', /no such target/],
    [{ portal: PORTAL, target, lun: 9 }, 'ENOENT', /no such LUN/],
    [{ portal: '127.0.0.1:1', target, lun: 1 }, 'ECONNREFUSED', /connection refused/],
    [{ portal: PORTAL, target: `${IQN}:chap`, lun: 1 }, 'EACCES', /CHAP/],
    [{ portal: PORTAL, target: `${IQN}:chap`, lun: 1, user: CHAP_USER, password: `${password}x` }, 'EACCES', /CHAP/],
  ] as const;
  for (const [params, code, re] of cases) {
    const s = new IscsiSession({ timeoutSec: 5 });
    const e = await failure(s.login(params));
    assert.is(e.code, code, e.message);
    assert.match(e.message, re);
    assert.not.ok(e.message.includes(password), 'no password in the message');
    s.destroy();
  }
  const ok = new IscsiSession();
  await ok.login({ portal: PORTAL, target: `${IQN}:chap`, lun: 1, user: CHAP_USER, password });
  await ok.close();
});

test('target gone mid-transfer: tasks fail at once with ECONNRESET', async () => {
  const proxy = await iscsiProxy();
  const s = new IscsiSession({ timeoutSec: 5 });
  try {
    await s.login({ portal: proxy.portal, target, lun: 3 });
    const start = Date.now();
    const reads = Array.from({ length: 16 }, (_, i) => s.read16(i * 2048, 2048, 512, Buffer.alloc(1 << 20)));
    proxy.kill();
    const results = await Promise.allSettled(reads);
    const errors = results
      .filter((r): r is PromiseRejectedResult => r.status === 'rejected')
      .map((r) => r.reason as IscsiError);
    assert.ok(errors.length > 0, 'reads fail');
    for (const e of errors) assert.ok(['ECONNRESET', 'ETIMEDOUT'].includes(e.code), `${e.code}: ${e.message}`);
    assert.ok(Date.now() - start < 8000, `failed after ${Date.now() - start} ms`);
    assert.is(s.outstanding, 0);
  } finally {
    proxy.kill();
    s.destroy();
  }
});

test('a hung target: tasks time out (ETIMEDOUT) within the session timeout', async () => {
  const proxy = await iscsiProxy();
  const s = new IscsiSession({ timeoutSec: 2 });
  try {
    await s.login({ portal: proxy.portal, target, lun: 3 });
    proxy.freeze();
    const start = Date.now();
    const e = await failure(s.read16(0, 8, 512, Buffer.alloc(4096)));
    const elapsed = Date.now() - start;
    assert.is(e.code, 'ETIMEDOUT', e.message);
    // libiscsi keeps deadlines in whole seconds (time()): up to a second early.
    assert.ok(elapsed >= 900 && elapsed < 6000, `timed out after ${elapsed} ms`);
  } finally {
    proxy.kill();
    s.destroy();
  }
});

test.run();
