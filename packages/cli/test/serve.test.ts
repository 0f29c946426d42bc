// `blockconv serve` of images on the network: a qcow2 on NFS (loopback NFS-Ganesha) and
// an iSCSI LUN (loopback tgtd), read and written by nbdcopy, checked by qemu-img compare.
import { execFileSync, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BASE_URL, EXPORT_DIR, ensureServer as ensureNfs, scratchName } from '../../../tools/test/nfs-server.js';
import { LUN_DIR, PORTAL, IQN, ensureServer as ensureIscsi, wipeLun } from '../../../tools/test/iscsi-server.js';

const BIN = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'blockconv.js');
const MiB = 1024 * 1024;

/** Serves `image` on a Unix socket until `body` is done; returns serve's exit code. */
async function serving(image: string, flags: string[], body: (url: string) => void): Promise<number | null> {
  const dir = fs.mkdtempSync(join(tmpdir(), 'blockconv-serve-'));
  const child = spawn(
    process.execPath,
    [BIN, 'serve', '--output', 'json', '--socket', join(dir, 's.sock'), ...flags, image],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let err = '';
  child.stderr.on('data', (d: Buffer) => {
    err += d.toString();
  });
  try {
    const url = await new Promise<string>((resolve, reject) => {
      let out = '';
      child.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        const line = out.split('\n').find((l) => l.includes('"listening"'));
        if (line) resolve((JSON.parse(line) as { url: string }).url);
      });
      child.once('exit', (code) => reject(new Error(`serve exited (${code}): ${err}`)));
    });
    body(url);
  } finally {
    if (child.exitCode === null) child.kill('SIGTERM');
  }
  const code = await new Promise<number | null>((r) =>
    child.exitCode !== null ? r(child.exitCode) : child.once('exit', (c) => r(c)),
  );
  fs.rmSync(dir, { recursive: true, force: true });
  assert.is(code, 0, err);
  return code;
}

test('a qcow2 on NFS, served read-only: nbdcopy reads exactly its content', async () => {
  ensureNfs();
  const name = scratchName('serve').replace(/\.raw$/, '.qcow2');
  const local = join(EXPORT_DIR, name);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', local, '32M']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x61 1M 3M', '-c', 'write -P 0x62 20M 64k', local], {
    stdio: 'ignore',
  });
  const out = join(tmpdir(), `${name}.raw`);
  try {
    await serving(`${BASE_URL}/${name}`, ['-r'], (url) => execFileSync('nbdcopy', [url, out]));
    execFileSync('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', local, out]);
  } finally {
    fs.rmSync(local, { force: true });
    fs.rmSync(out, { force: true });
  }
});

test('an iSCSI LUN, served read-write: what nbdcopy writes is on the LUN', async () => {
  ensureIscsi();
  const lun = { url: `iscsi://${PORTAL}/${IQN}:disk512/2`, file: join(LUN_DIR, 'disk512-small.img') };
  wipeLun(lun.file);
  const src = join(tmpdir(), `serve-lun-${process.pid}.raw`);
  execFileSync('dd', ['if=/dev/urandom', `of=${src}`, 'bs=1M', 'count=4', 'status=none']);
  try {
    await serving(lun.url, ['-f', 'raw'], (url) => execFileSync('nbdcopy', [src, url]));
    execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, lun.file]);
    assert.is(fs.statSync(lun.file).size, 4 * MiB);
  } finally {
    fs.rmSync(src, { force: true });
  }
});

test.run();
