// Several connections per image (connections=N): data stays right, requests really go
// over every connection, and bad values are refused with a clear error.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { BlockError, DriverRegistry, convert } from '@blockconv/core';
import { drivers as raw } from '@blockconv/driver-raw';
import { drivers as nfs, openNfs, createNfs, type NfsBackend } from '../../src/index.js';
import { BASE_URL, ensureServer, failure, run, scratch } from '../helpers.js';

ensureServer();
const MiB = 1024 * 1024;
const registry = new DriverRegistry().register(...raw, ...nfs);

/** 16 MiB of varied data with holes, so that a wrong offset anywhere shows. */
function localImage(dir: string): string {
  const file = path.join(dir, 'src.raw');
  const buf = Buffer.alloc(16 * MiB);
  for (let off = 0; off < buf.length; off += 4096) {
    if ((off >> 20) % 3 === 1) continue; // every third MiB a hole
    buf.writeUInt32LE(off, off);
    buf.fill((off >> 12) & 0xff, off + 4, off + 4096);
  }
  fs.writeFileSync(file, buf);
  return file;
}

async function copy(from: string, to: string, create = true): Promise<void> {
  const source = await registry.open(from, { readOnly: true, format: 'raw' });
  try {
    const target = create
      ? await registry.create(to, source.size, { format: 'raw' })
      : await registry.open(to, { format: 'raw' });
    try {
      await convert({ sources: [source], target, workers: 8, outOfOrder: true });
    } finally {
      await target.close();
    }
  } finally {
    await source.close();
  }
}

const test = suite('nfs connections=N');
let dir: string;
test.before.each(() => {
  dir = fs.mkdtempSync('/var/tmp/blockconv-nfs-test-');
});
test.after.each(() => fs.rmSync(dir, { recursive: true, force: true }));

for (const version of [3, 4]) {
  test(`4 connections (v${version}): convert there and back, every byte right`, async () => {
    const src = localImage(dir);
    const remote = scratch('conn', version === 4 ? '?version=4&connections=4' : '?connections=4');
    try {
      await copy(src, remote.url);
      run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', remote.local, src]);
      const back = path.join(dir, 'back.raw');
      await copy(remote.url, back);
      run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', back, src]);
    } finally {
      remote.remove();
    }
  });
}

test('requests spread over the connections (counted per connection)', async () => {
  const remote = scratch('spread');
  fs.writeFileSync(remote.local, Buffer.alloc(8 * MiB, 7));
  const b = (await openNfs(`${remote.url}?connections=4`)) as NfsBackend;
  try {
    assert.is(b.stats.connections.length, 4);
    const before = b.stats.connections.map((c) => c.submitted);
    // 64 reads and 64 writes of 64 KiB, all in flight at once.
    const ops: Promise<unknown>[] = [];
    for (let i = 0; i < 64; i++) ops.push(b.read(i * 65536, 65536));
    assert.ok(
      b.stats.connections.every((c) => c.outstanding > 0),
      `in flight per connection: ${b.stats.connections.map((c) => c.outstanding)}`,
    );
    for (let i = 0; i < 64; i++) ops.push(b.write(i * 65536, Buffer.alloc(65536, i)));
    await Promise.all(ops);
    await b.flush();
    const sent = b.stats.connections.map((c, i) => c.submitted - before[i]!);
    // 128 I/O requests and a COMMIT each: the least busy connection takes the next one.
    assert.is(
      sent.reduce((a, n) => a + n, 0),
      128 + 4,
    );
    for (const n of sent) assert.ok(n >= 16, `requests per connection: ${sent}`);
    const back = await b.read(5 * 65536, 65536);
    assert.is(back[100], 5);
  } finally {
    await b.close();
    remote.remove();
  }
});

test('the open option connections=N (-o/-l) does the same; one connection by default', async () => {
  const remote = scratch('opt');
  await createNfs(remote.url, MiB);
  try {
    const b = (await openNfs(remote.url, { options: { connections: '3' } })) as NfsBackend;
    assert.is(b.stats.connections.length, 3);
    assert.is((await b.info()).connections, 3);
    await b.close();
    const one = (await openNfs(remote.url)) as NfsBackend;
    assert.is(one.stats.connections.length, 1);
    await one.close();
    // The same value in both places is fine.
    const both = (await openNfs(`${remote.url}?connections=2`, { options: { connections: '2' } })) as NfsBackend;
    assert.is(both.stats.connections.length, 2);
    await both.close();
  } finally {
    remote.remove();
  }
});

test('bad values are refused with a clear one-line error', async () => {
  const url = `${BASE_URL}/whatever.raw`;
  for (const [location, options, re] of [
    [`${url}?connections=0`, undefined, /connections=0: expected a whole number from 1 to 32/],
    [`${url}?connections=33`, undefined, /connections=33: expected a whole number from 1 to 32/],
    [`${url}?connections=abc`, undefined, /connections=abc: expected a whole number/],
    [`${url}?connections=1.5`, undefined, /connections=1.5: expected a whole number/],
    [`${url}?connections=-2`, undefined, /connections=-2: expected a whole number/],
    [`${url}?connections=`, undefined, /connections=: expected a whole number/],
    [url, { connections: 'many' }, /connections=many: expected a whole number/],
    [`${url}?connections=2`, { connections: '4' }, /connections given twice with different values \(2, 4\)/],
    [`${url}?connections=2&connections=3`, undefined, /connections given twice/],
    [`${url}?connections=2&readahead=65536`, undefined, /cannot be combined with readahead/],
  ] as const) {
    for (const fn of [() => openNfs(location, { options }), () => createNfs(location, MiB, { options })]) {
      const e = await failure(fn);
      assert.instance(e, BlockError, String(e));
      assert.is(e.code, 'EINVAL', e.message);
      assert.match(e.message, re);
      assert.ok(e.message.startsWith(location), `names the location: ${e.message}`);
      assert.not.match(e.message, /\n/);
    }
  }
});

test('a failed open closes the connections already made', async () => {
  const fds = () => fs.readdirSync('/proc/self/fd').length;
  const before = fds();
  const e = await failure(() => openNfs(`${BASE_URL}/no-such-file.raw?connections=4`));
  assert.is((e as BlockError).code, 'ENOENT');
  await new Promise((r) => setImmediate(r));
  assert.is(fds(), before);
});

test.run();
