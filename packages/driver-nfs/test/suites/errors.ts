// Bad input and faults give a BlockError with a code and a clear one-line message.
import * as fs from 'node:fs';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { BlockError, gateBackend } from '@blockconv/core';
import { openNfs, createNfs } from '../../src/index.js';
import { BASE_URL, ensureServer, failure, nfsProxy, scratch } from '../helpers.js';

ensureServer();
const test = suite('nfs errors');

async function openError(url: string, options = {}): Promise<BlockError> {
  const e = await failure(() => openNfs(url, options));
  assert.instance(e, BlockError, String(e));
  assert.not.match(e.message, /\n/, 'one line');
  assert.ok(e.message.includes(url), `names the location: ${e.message}`);
  return e as BlockError;
}

test('unknown host', async () => {
  const e = await openError('nfs://no-such-host.invalid/export/x.raw');
  assert.is(e.code, 'ENOTFOUND');
  assert.match(e.message, /unknown NFS server host "no-such-host.invalid"/);
});

test('connection refused (nothing listens on the port)', async () => {
  for (const q of ['', '&version=4']) {
    const e = await openError(`nfs://127.0.0.1/export/x.raw?nfsport=1&mountport=1${q}`);
    assert.is(e.code, 'ECONNREFUSED', e.message);
  }
});

test('a user part is refused, its password shown nowhere (libnfs would quote it as the host name)', async () => {
  for (const url of [
    'nfs://bob:Marker-nfs-pw@127.0.0.1/export/x.raw',
    'nfs://bob%Marker-nfs-pw@127.0.0.1/export/x.raw?version=4',
  ]) {
    for (const e of [await failure(() => openNfs(url)), await failure(() => createNfs(url, 4096))]) {
      assert.instance(e, BlockError, String(e));
      assert.is((e as BlockError).code, 'EINVAL');
      assert.match(e.message, /nfs:\/\/bob@127\.0\.0\.1\/export\/x\.raw.*take no user or password/);
      assert.not.match(`${e.message}\n${e.stack}\n${(e as BlockError).location}`, /Marker-nfs-pw/);
    }
  }
});

test('wrong export', async () => {
  const e = await openError('nfs://127.0.0.1/no-such-export/x.raw');
  assert.is(e.code, 'EACCES', e.message);
  assert.match(e.message, /MNT3ERR_ACCES/);
});

test('missing file', async () => {
  for (const q of ['', '?version=4']) {
    const e = await openError(`${BASE_URL}/no-such-file.raw${q}`);
    assert.is(e.code, 'ENOENT', e.message);
  }
});

test('permission denied: the server judges the uid/gid of the URL against the file (v3 and v4)', async () => {
  // Files owned by root in the export: 0600 (others may not read), 0644 (others may not
  // write); the export's directory is root's 0755 (others may not create in it).
  const secret = scratch('perm-r');
  const readable = scratch('perm-w');
  fs.writeFileSync(secret.local, Buffer.alloc(4096, 1), { mode: 0o600 });
  fs.writeFileSync(readable.local, Buffer.alloc(4096, 2), { mode: 0o644 });
  fs.chmodSync(secret.local, 0o600);
  fs.chmodSync(readable.local, 0o644);
  const as = 'uid=1000&gid=1000';
  try {
    for (const v of ['', '&version=4']) {
      let e = await openError(`${secret.url}?${as}${v}`, { readOnly: true });
      assert.is(e.code, 'EACCES', e.message);
      assert.match(e.message, /: permission denied: uid 1000, gid 1000 may not open the file read-only \(NFS.*ACCES/);
      e = await openError(`${readable.url}?${as}${v}`);
      assert.is(e.code, 'EACCES', e.message);
      assert.match(e.message, /permission denied: uid 1000, gid 1000 may not open the file read-write/);
      // Reading what the mode allows works.
      const ro = await openNfs(`${readable.url}?${as}${v}`, { readOnly: true });
      assert.is((await ro.read(0, 1))[0], 2);
      await ro.close();
      const fresh = scratch('perm-new', `?${as}${v}`);
      const c = await failure(() => createNfs(fresh.url, 65536));
      assert.instance(c, BlockError);
      assert.is(c.code, 'EACCES', c.message);
      assert.match(
        c.message,
        /create: permission denied: uid 1000, gid 1000 may not create or open the file read-write/,
      );
      assert.not.match(c.message, /\n/);
      assert.not.ok(fs.existsSync(fresh.local));
    }
    // As root (no_root_squash) the same files open read-write.
    const rw = await openNfs(`${secret.url}?uid=0&gid=0`);
    await rw.close();
  } finally {
    secret.remove();
    readable.remove();
  }
});

test('invalid URL options and URLs', async () => {
  for (const [url, re] of [
    [`${BASE_URL}/x.raw?bogus=1`, /unknown NFS URL option "bogus"/],
    [`${BASE_URL}/x.raw?version=7`, /NFS version 7 is not supported/],
    [`${BASE_URL}/x.raw?uid=root`, /uid=root: expected a number/],
    ['nfs:///export/x.raw', /no server/],
    ['nfs://127.0.0.1/export/', /names no file/],
  ] as const) {
    const e = await openError(url);
    assert.is(e.code, 'EINVAL', e.message);
    assert.match(e.message, re);
  }
  const e = await openError(`${BASE_URL}/x.raw`, { options: { timeout: 'soon' } });
  assert.is(e.code, 'EINVAL');
});

test("requests on a closed image, and writes to a read-only one (through the core's gate)", async () => {
  const s = scratch('ro');
  await createNfs(s.url, 65536);
  try {
    const ro = gateBackend(await openNfs(s.url, { readOnly: true }));
    assert.is((await failure(() => ro.write(0, new Uint8Array(10)))).code, 'EROFS');
    await ro.close();
    assert.is((await failure(() => ro.read(0, 10))).code, 'EBADF');
  } finally {
    s.remove();
  }
});

test('server gone mid-transfer: a clear error within a bounded time', async () => {
  const s = scratch('gone');
  fs.writeFileSync(s.local, Buffer.alloc(8 << 20, 3));
  const proxy = await nfsProxy();
  try {
    // NFSv4 uses the NFS port only, so all of the image's traffic goes through the proxy.
    const b = await openNfs(`${s.url}?version=4&nfsport=${proxy.port}`, { options: { timeout: '2' } });
    await b.read(0, 65536);
    const start = Date.now();
    const reads = Array.from({ length: 8 }, (_, i) => b.read(i << 20, 1 << 20));
    proxy.kill();
    const results = await Promise.allSettled(reads);
    const elapsed = Date.now() - start;
    const errors = results
      .filter((r): r is PromiseRejectedResult => r.status === 'rejected')
      .map((r) => r.reason as BlockError);
    assert.ok(errors.length > 0, 'reads fail');
    for (const e of errors) {
      assert.instance(e, BlockError);
      assert.ok(['ETIMEDOUT', 'ECONNRESET', 'ECONNREFUSED'].includes(e.code), `${e.code}: ${e.message}`);
    }
    assert.ok(elapsed < 15000, `failed after ${elapsed} ms`);
    await b.close().catch(() => {});
  } finally {
    proxy.kill();
    s.remove();
  }
});

test('server gone with 3 connections: every request fails cleanly, none hangs', async () => {
  const s = scratch('gone3');
  fs.writeFileSync(s.local, Buffer.alloc(8 << 20, 3));
  const proxy = await nfsProxy();
  try {
    const b = await openNfs(`${s.url}?version=4&nfsport=${proxy.port}&connections=3`, { options: { timeout: '2' } });
    assert.is(proxy.connections, 3);
    const start = Date.now();
    const ops = [
      ...Array.from({ length: 6 }, (_, i) => b.read(i << 20, 1 << 20)),
      b.write(7 << 20, Buffer.alloc(8192, 1)),
    ];
    proxy.kill();
    const results = await Promise.allSettled(ops);
    assert.ok(Date.now() - start < 15000, `settled after ${Date.now() - start} ms`);
    for (const r of results) {
      if (r.status === 'fulfilled') continue; // answered before the kill
      assert.instance(r.reason, BlockError);
      assert.ok(
        ['ETIMEDOUT', 'ECONNRESET', 'ECONNREFUSED'].includes((r.reason as BlockError).code),
        (r.reason as Error).message,
      );
    }
    assert.ok(
      results.some((r) => r.status === 'rejected'),
      'requests fail',
    );
    await b.close().catch(() => {});
  } finally {
    proxy.kill();
    s.remove();
  }
});

test('NFSv3: a dropped connection is re-established and I/O goes on', async () => {
  const s = scratch('reconnect');
  fs.writeFileSync(s.local, Buffer.alloc(1 << 20, 4));
  const proxy = await nfsProxy();
  try {
    // mountd direct, NFS through the proxy.
    const b = await openNfs(`${s.url}?mountport=20048&nfsport=${proxy.port}`, { options: { timeout: '5' } });
    await b.read(0, 4096);
    proxy.drop();
    await new Promise((r) => setTimeout(r, 50));
    // libnfs reconnects and dup2()s the new socket onto the same fd number: the binding
    // must notice the new socket behind the fd, or this read hangs until the timeout.
    const got = await b.read(0, 65536);
    assert.is(got[0], 4);
    assert.is(proxy.connections, 2);
    await b.close();
  } finally {
    proxy.kill();
    s.remove();
  }
});

test('NFSv4: libnfs 4.0 does not reconnect; a dropped connection fails requests cleanly', async () => {
  const s = scratch('v4drop');
  fs.writeFileSync(s.local, Buffer.alloc(1 << 20, 4));
  const proxy = await nfsProxy();
  try {
    const b = await openNfs(`${s.url}?version=4&nfsport=${proxy.port}`, { options: { timeout: '5' } });
    await b.read(0, 4096);
    proxy.drop();
    await new Promise((r) => setTimeout(r, 50));
    const e = await failure(() => b.read(0, 65536));
    assert.instance(e, BlockError);
    assert.is(e.code, 'ECONNRESET', e.message);
    await b.close().catch(() => {});
  } finally {
    proxy.kill();
    s.remove();
  }
});

test.run();
