/**
 * Targets that run out of room, through the command: a local file system (tmpfs), an NFS
 * export whose file system fills up (ENOSPC), one under a quota (EDQUOT), both from the
 * real NFS-Ganesha of tools/nfs-server.sh (btrfs on loop devices; a qgroup limit for the
 * quota), and a LUN smaller than the source (packages/driver-iscsi's convert suite).
 * Each: exit 1, one line naming the cause, the target and the offset; no "done".
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { QUOTA_DIR, QUOTA_URL, SMALL_DIR, SMALL_URL, ensureServer } from '../../../tools/test/nfs-server.js';

const BIN = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'blockconv.js');
const MiB = 1024 * 1024;
let dir = '';
let source = '';

function run(...args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

const mounted = (d: string): boolean => spawnSync('mountpoint', ['-q', d]).status === 0;

/**
 * Empties an export. Truncated before they go: ganesha keeps files open, and the space of
 * a file unlinked behind its back stays taken while it does. Then btrfs accounts for it
 * (freed space and qgroup usage lag the truncation).
 */
function empty(d: string): void {
  // Over its limit, btrfs refuses even the truncation: lift the limit while emptying.
  const quota = d === QUOTA_DIR;
  if (quota) spawnSync('btrfs', ['qgroup', 'limit', 'none', d]);
  for (const f of fs.readdirSync(d)) {
    const file = join(d, f);
    if (fs.statSync(file).isFile()) fs.truncateSync(file, 0);
    fs.rmSync(file, { force: true, recursive: true });
  }
  spawnSync('btrfs', ['filesystem', 'sync', d]);
  spawnSync('btrfs', ['quota', 'rescan', '-w', d]);
  if (quota) spawnSync('btrfs', ['qgroup', 'limit', '8M', d]);
}

function assertFull(r: { code: number | null; stdout: string; stderr: string }, target: RegExp, cause: RegExp): void {
  assert.is(r.code, 1, r.stderr);
  const lines = r.stderr
    .trim()
    .split('\n')
    .filter((l) => !l.startsWith('blockconv: note: '));
  assert.is(lines.length, 1, r.stderr);
  assert.match(lines[0]!, target);
  assert.match(lines[0]!, cause);
  assert.not.match(r.stdout, /"event":"done"/);
}

test.before(() => {
  ensureServer();
  dir = fs.mkdtempSync('/var/tmp/blockconv-full-');
  source = join(dir, 'source.raw');
  // Incompressible and without zero runs: every byte has to be written.
  fs.writeFileSync(source, crypto.randomBytes(160 * MiB));
});
test.after(() => {
  fs.rmSync(dir, { recursive: true, force: true });
  for (const d of [SMALL_DIR, QUOTA_DIR]) if (mounted(d)) empty(d);
});

test('an NFS file system that fills up: ENOSPC named, with the offset, raw and qcow2', () => {
  if (!mounted(SMALL_DIR)) {
    console.warn('  (skipped: tools/nfs-server.sh serves no /small here: no loop device or btrfs)');
    return;
  }
  empty(SMALL_DIR);
  assertFull(
    run('convert', '--output', 'json', '-O', 'raw', source, `${SMALL_URL}/full.raw`),
    /nfs:\/\/127\.0\.0\.1\/small\/full\.raw write at offset \d+/,
    /no space left on the NFS server's file system \(NFS: Write failed with NFS3ERR_NOSPC/,
  );
  empty(SMALL_DIR);
  assertFull(
    run('convert', '--output', 'json', '-O', 'qcow2', source, `${SMALL_URL}/full.qcow2`),
    /nfs:\/\/127\.0\.0\.1\/small\/full\.qcow2 write at offset \d+/,
    /no space left on the NFS server's file system/,
  );
  // What is left is a qcow2 with leaks at worst: never corrupt.
  const chk = spawnSync('qemu-img', ['check', join(SMALL_DIR, 'full.qcow2')], { encoding: 'utf8' });
  assert.ok(chk.status === 0 || chk.status === 3, `qemu-img check exit ${chk.status}: ${chk.stdout}${chk.stderr}`);
  empty(SMALL_DIR);
});

test('an NFS export under a quota: EDQUOT named (libnfs reports it as ERANGE), with the offset', () => {
  if (!mounted(QUOTA_DIR)) {
    console.warn('  (skipped: tools/nfs-server.sh serves no /quota here)');
    return;
  }
  empty(QUOTA_DIR);
  const small = join(dir, 'sixteen.raw');
  execFileSync('head', ['-c', String(16 * MiB), source], { stdio: ['ignore', fs.openSync(small, 'w'), 'inherit'] });
  assertFull(
    run('convert', '--output', 'json', '-O', 'raw', small, `${QUOTA_URL}/over.raw`),
    /nfs:\/\/127\.0\.0\.1\/quota\/over\.raw write at offset \d+/,
    /over the user's quota on the NFS server \(NFS: Write failed with NFS3ERR_DQUOT/,
  );
  empty(QUOTA_DIR);
});

test.run();
