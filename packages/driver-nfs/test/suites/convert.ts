// Convert local raw -> raw on NFS and back, checked by qemu-img (which reads nfs://
// itself) and through the export's local directory.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { DriverRegistry, checksumImage, convert } from '@blockconv/core';
import { drivers as raw } from '@blockconv/driver-raw';
import { drivers as nfs, type NfsBackend } from '../../src/index.js';
import { ensureServer, run, scratch } from '../helpers.js';

ensureServer();
const MiB = 1024 * 1024;
const registry = new DriverRegistry().register(...raw, ...nfs);

function localImage(dir: string): string {
  // 8 MiB: data, a hole, data at an unaligned offset, a tail of data.
  const file = path.join(dir, 'src.raw');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 8 * MiB);
  const fd = fs.openSync(file, 'r+');
  for (const [off, len] of [
    [0, MiB],
    [3 * MiB + 12345, 700000],
    [8 * MiB - 65536, 65536],
  ] as const) {
    fs.writeSync(fd, Buffer.alloc(len, (off % 251) + 1), 0, len, off);
  }
  fs.closeSync(fd);
  return file;
}

async function copy(from: string, to: string, workers = 8): Promise<void> {
  const source = await registry.open(from, { readOnly: true, format: 'raw' });
  try {
    const target = await registry.create(to, source.size, { format: 'raw' });
    try {
      await convert({ sources: [source], target, workers });
    } finally {
      await target.close();
    }
  } finally {
    await source.close();
  }
}

const test = suite('convert over NFS');
let dir: string;
test.before.each(() => {
  dir = fs.mkdtempSync('/var/tmp/blockconv-nfs-test-');
});
test.after.each(() => fs.rmSync(dir, { recursive: true, force: true }));

for (const version of [3, 4]) {
  const query = version === 4 ? '?version=4' : '';
  test(`local raw -> nfs raw (v${version}) -> local raw, compared by qemu-img`, async () => {
    const src = localImage(dir);
    const remote = scratch('conv', query);
    try {
      await copy(src, remote.url);
      // qemu-img's own libnfs client, and the export's directory on this machine.
      run('qemu-img', [
        'compare',
        '-q',
        '-f',
        'raw',
        '-F',
        'raw',
        `nfs://127.0.0.1/export/${path.basename(remote.local)}`,
        src,
      ]);
      run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', remote.local, src]);
      assert.is(fs.statSync(remote.local).size, 8 * MiB);
      const back = path.join(dir, 'back.raw');
      await copy(remote.url, back);
      run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', back, src]);
    } finally {
      remote.remove();
    }
  });
}

// qcow2 is another package; the test runs when it is installed (it is in this repository).
const qcow2 = await import('@blockconv/driver-qcow2' as string).then(
  (m: { drivers: typeof raw }) => m.drivers,
  () => undefined,
);
(qcow2 ? test : test.skip)('qcow2 on NFS -> local raw (format probed over the nfs protocol)', async () => {
  const reg = new DriverRegistry().register(...raw, ...nfs, ...(qcow2 ?? []));
  const remote = scratch('tmpl');
  const qcow = remote.local.replace(/\.raw$/, '.qcow2');
  try {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '16M']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 3M', '-c', 'write -P 0x11 9M 64k', qcow]);
    const source = await reg.open(remote.url.replace(/\.raw$/, '.qcow2'), { readOnly: true });
    assert.is(source.driverName, 'qcow2');
    const out = path.join(dir, 'out.raw');
    const target = await reg.create(out, source.size, { format: 'raw' });
    await convert({ sources: [source], target });
    await Promise.all([source.close(), target.close()]);
    run('qemu-img', ['compare', '-q', '-F', 'raw', `nfs://127.0.0.1/export/${path.basename(qcow)}`, out]);
  } finally {
    fs.rmSync(qcow, { force: true });
  }
});

test('a fresh target stays sparse: zero runs are not written', async () => {
  const src = localImage(dir);
  const remote = scratch('sparse');
  try {
    await copy(src, remote.url);
    const used = fs.statSync(remote.local).blocks * 512;
    assert.ok(used < 4 * MiB, `target uses ${used} bytes of 8 MiB`);
  } finally {
    remote.remove();
  }
});

test('8 concurrent reads are in flight together on the connection', async () => {
  const remote = scratch('par');
  fs.writeFileSync(remote.local, Buffer.alloc(2 * MiB, 9));
  const b = (await registry.openProtocol(remote.url, { readOnly: true })) as NfsBackend;
  try {
    const reads = Array.from({ length: 8 }, (_, i) => b.read(i * 256 * 1024, 256 * 1024));
    assert.is(b.stats.outstanding, 8);
    await Promise.all(reads);
    assert.ok(b.stats.peakOutstanding > 1, `peak ${b.stats.peakOutstanding}`);
  } finally {
    await b.close();
    remote.remove();
  }
});

test("checksum over NFS (v3 and v4) equals the local file's, and convert --checksum to NFS agrees", async () => {
  const dir = fs.mkdtempSync('/var/tmp/blockconv-nfs-ck-');
  const remote = scratch('ck');
  try {
    const local = localImage(dir);
    const src = await registry.open(local, { readOnly: true, format: 'raw' });
    const want = (await checksumImage(src)).checksum;
    const target = await registry.create(remote.url, src.size, { format: 'raw' });
    const r = await convert({ sources: [src], target, checksum: true, verify: true });
    await Promise.all([src.close(), target.close()]);
    assert.is(r.checksum, want);
    assert.ok(r.verified);
    for (const query of ['', '?version=4']) {
      const img = await registry.open(remote.url + query, { readOnly: true, format: 'raw' });
      try {
        assert.is((await checksumImage(img)).checksum, want, `nfs${query}`);
      } finally {
        await img.close();
      }
    }
  } finally {
    remote.remove();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
