// qcow2 over NFS: the qcow2 driver grows its file through resize(), so local raw ->
// qcow2 on NFS (plain and compressed) works, and reads back; checked by qemu-img compare
// (through nfs:// itself and the export's directory) and qemu-img check.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { DriverRegistry, convert, gateBackend, type BlockDriver } from '@blockconv/core';
import { drivers as raw } from '@blockconv/driver-raw';
import { drivers as nfs, openNfs, createNfs } from '../../src/index.js';
import { ensureServer, run, scratch } from '../helpers.js';

ensureServer();
const MiB = 1024 * 1024;

const test = suite('nfs resize, and qcow2 on NFS');
let dir: string;
test.before.each(() => {
  dir = fs.mkdtempSync('/var/tmp/blockconv-nfs-test-');
});
test.after.each(() => fs.rmSync(dir, { recursive: true, force: true }));

for (const query of ['', '?version=4', '?connections=3']) {
  test(`resize grows and shrinks the file${query}`, async () => {
    const s = scratch('resize', query);
    await createNfs(s.url, 65536);
    const b = gateBackend(await openNfs(s.url));
    try {
      assert.ok(b.resize, 'resize is implemented');
      await b.write(0, Buffer.alloc(4096, 1));
      await b.resize!(5 * MiB);
      assert.is(b.size, 5 * MiB);
      assert.is(fs.statSync(s.local).size, 5 * MiB);
      // The grown range reads zeroes, and takes writes up to the new end.
      assert.ok((await b.read(4 * MiB, 65536)).every((x) => x === 0));
      await b.write(5 * MiB - 2048, Buffer.alloc(2048, 2));
      await b.resize!(8192);
      assert.is(b.size, 8192);
      assert.is(fs.statSync(s.local).size, 8192);
      assert.is((await b.read(0, 1))[0], 1);
      const e = await b.write(8192, Buffer.alloc(1)).then(
        () => undefined,
        (err: { code: string }) => err,
      );
      assert.is(e?.code, 'ERANGE');
      const ro = gateBackend(await openNfs(s.url, { readOnly: true }));
      assert.is(
        (
          await ro.resize!(0).then(
            () => undefined,
            (err: { code: string }) => err,
          )
        )?.code,
        'EROFS',
      );
      await ro.close();
    } finally {
      await b.close();
      s.remove();
    }
  });
}

// qcow2 is another package; the tests run when it is installed (it is in this repository).
const qcow2 = await import('@blockconv/driver-qcow2' as string).then(
  (m: { drivers: readonly BlockDriver[] }) => m.drivers,
  () => undefined,
);
const registry = new DriverRegistry().register(...raw, ...nfs, ...(qcow2 ?? []));
const q = qcow2 ? test : test.skip;

/** 24 MiB: random data, text (compressible), a hole, an unaligned run, data at the end. */
function localImage(): string {
  const file = path.join(dir, 'src.raw');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, 24 * MiB);
  const fd = fs.openSync(file, 'r+');
  const random = Buffer.alloc(3 * MiB);
  for (let i = 0; i < random.length; i += 4) random.writeUInt32LE((Math.random() * 2 ** 32) >>> 0, i);
  fs.writeSync(fd, random, 0, random.length, MiB);
  const text = Buffer.from('blockconv writes qcow2 onto NFS through libnfs; '.repeat(60000));
  fs.writeSync(fd, text, 0, text.length, 6 * MiB);
  fs.writeSync(fd, Buffer.alloc(100000, 0x3c), 0, 100000, 13 * MiB + 777);
  fs.writeSync(fd, Buffer.alloc(65536, 0x7e), 0, 65536, 24 * MiB - 65536);
  fs.closeSync(fd);
  return file;
}

async function toQcow2(src: string, url: string, compress = false): Promise<void> {
  const source = await registry.open(src, { readOnly: true, format: 'raw' });
  try {
    const target = await registry.create(url, source.size, { format: 'qcow2' });
    assert.is(target.driverName, 'qcow2');
    try {
      await convert({ sources: [source], target, workers: 8, outOfOrder: true, compress });
      await target.flush();
    } finally {
      await target.close();
    }
  } finally {
    await source.close();
  }
}

function check(local: string): { 'compressed-clusters'?: number; 'allocated-clusters'?: number } {
  // qemu-img check exits 0 only for a clean image.
  return JSON.parse(execFileSync('qemu-img', ['check', '--output=json', local], { encoding: 'utf8' })) as {
    'compressed-clusters'?: number;
  };
}

for (const query of ['', '?connections=4', '?version=4']) {
  q(`local raw -> qcow2 on NFS${query} -> local raw, checked by qemu-img`, async () => {
    const src = localImage();
    const remote = scratch('q2', query);
    const url = remote.url.replace(/\.raw/, '.qcow2');
    const local = remote.local.replace(/\.raw$/, '.qcow2');
    try {
      await toQcow2(src, url);
      // qemu-img reads nfs:// itself (its own libnfs client), and the export's directory.
      run('qemu-img', ['compare', '-q', '-F', 'raw', `nfs://127.0.0.1/export/${path.basename(local)}`, src]);
      run('qemu-img', ['compare', '-q', '-F', 'raw', local, src]);
      check(local);
      assert.is(JSON.parse(run('qemu-img', ['info', '--output=json', local])).format, 'qcow2');
      // Back: qcow2 probed over the nfs protocol, to a local raw file.
      const source = await registry.open(url, { readOnly: true });
      assert.is(source.driverName, 'qcow2');
      const out = path.join(dir, 'back.raw');
      const target = await registry.create(out, source.size, { format: 'raw' });
      await convert({ sources: [source], target });
      await Promise.all([source.close(), target.close()]);
      run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', out, src]);
    } finally {
      fs.rmSync(local, { force: true });
    }
  });
}

q('compressed (-c) qcow2 onto NFS', async () => {
  const src = localImage();
  const remote = scratch('q2c');
  const url = remote.url.replace(/\.raw/, '.qcow2');
  const local = remote.local.replace(/\.raw$/, '.qcow2');
  try {
    await toQcow2(src, url, true);
    run('qemu-img', ['compare', '-q', '-F', 'raw', `nfs://127.0.0.1/export/${path.basename(local)}`, src]);
    const c = check(local);
    assert.ok((c['compressed-clusters'] ?? 0) > 0, `compressed clusters: ${JSON.stringify(c)}`);
    // The text compresses: the file is well under the data it holds (~6.5 MiB).
    assert.ok(fs.statSync(local).size < 5.5 * MiB, `file is ${fs.statSync(local).size} bytes`);
  } finally {
    fs.rmSync(local, { force: true });
  }
});

q('the CLI: blockconv convert -O qcow2 in.raw nfs://.../x.qcow2, and back', async () => {
  const cli = path.resolve(import.meta.dirname, '../../../cli/bin/blockconv.js');
  if (!fs.existsSync(path.resolve(cli, '../../dist/main.bundle.js'))) return; // CLI not built
  const src = localImage();
  const remote = scratch('cli');
  const url = remote.url.replace(/\.raw/, '.qcow2');
  const local = remote.local.replace(/\.raw$/, '.qcow2');
  try {
    run('node', [cli, 'convert', '-q', '-O', 'qcow2', src, url]);
    check(local);
    run('qemu-img', ['compare', '-q', '-F', 'raw', local, src]);
    const out = path.join(dir, 'cli-back.raw');
    run('node', [cli, 'convert', '-q', '-O', 'raw', url, out]);
    run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', out, src]);
  } finally {
    fs.rmSync(local, { force: true });
  }
});

test.run();
