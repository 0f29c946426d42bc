/**
 * `blockconv check` against `qemu-img check` on clean, leaking and corrupt images,
 * repairs that qemu-img then finds clean, and the crash-safety claim of the write
 * side: a convert to qcow2 killed with SIGKILL at random moments leaves an image
 * with leaks at worst, which `check -r leaks` repairs.
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { CLI, MiB, cliAsync, create, headerOf, patch, qemuImg, qemuIo, readBytes, removeDir, tempDir } from './helpers.js';

const dir = tempDir('blockconv-qcow2-check-');
process.on('exit', () => removeDir(dir));

interface Verdict { corruptions: number; leaks: number; status: number }

function qemuCheck(image: string): Verdict {
  let out: string;
  let status = 0;
  try {
    // Leaks are listed one line each on stderr: there may be many.
    out = execFileSync('qemu-img', ['check', '--output=json', image], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], maxBuffer: 64 * MiB });
  } catch (err) {
    const e = err as { stdout?: string; status?: number };
    out = String(e.stdout ?? '');
    status = e.status ?? -1;
    if (!out.trim()) throw err;
  }
  const j = JSON.parse(out) as { corruptions?: number; leaks?: number };
  return { corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, status };
}

async function ourCheck(image: string, ...extra: string[]): Promise<Verdict & { stdout: string }> {
  const r = await cliAsync('check', '--output', 'json', ...extra, image);
  assert.ok(r.stdout.trim(), `check printed nothing: ${r.stderr}`);
  const j = JSON.parse(r.stdout) as { corruptions: number; leaks: number };
  return { corruptions: j.corruptions, leaks: j.leaks, status: r.status, stdout: r.stdout };
}

async function agree(image: string, expect: { corruptions: number; leaks: number; status: number }): Promise<void> {
  const q = qemuCheck(image);
  const o = await ourCheck(image);
  assert.equal({ corruptions: q.corruptions, leaks: q.leaks, status: q.status }, expect, 'qemu-img check');
  assert.equal({ corruptions: o.corruptions, leaks: o.leaks, status: o.status }, expect, `blockconv check: ${o.stdout}`);
}

/** An image with data, a zero cluster, a compressed cluster and a discard, written by qemu-io. */
function sample(name: string, options: Record<string, string | boolean> = {}): string {
  const image = create(path.join(dir, name), 16 * MiB, options);
  qemuIo(image, ['write -P 1 0 1M', 'write -z 2M 64k', 'write -c -P 2 4M 64k', 'write -P 3 6M 512k', 'discard 6M 64k']);
  return image;
}

/** Offset of the refcount entry of cluster `c` in the first refcount block (16-bit refcounts). */
function refcountEntry(image: string, c: number): number {
  const h = headerOf(image);
  const block = Number(readBytes(image, h.refcountTableOffset, 8).readBigUInt64BE(0));
  return block + c * 2;
}

const agreement = suite('check agrees with qemu-img check');
agreement('clean images: several layouts, snapshots, compressed clusters', async () => {
  await agree(sample('clean.qcow2'), { corruptions: 0, leaks: 0, status: 0 });
  await agree(sample('clean-v2.qcow2', { compat: '0.10' }), { corruptions: 0, leaks: 0, status: 0 });
  await agree(sample('clean-extl2.qcow2', { extended_l2: true }), { corruptions: 0, leaks: 0, status: 0 });
  await agree(sample('clean-rc1.qcow2', { refcount_bits: '1', cluster_size: '4096' }), { corruptions: 0, leaks: 0, status: 0 });
  const snap = sample('clean-snap.qcow2');
  qemuImg('snapshot', '-c', 's1', snap);
  qemuIo(snap, ['write -P 9 0 128k']);
  await agree(snap, { corruptions: 0, leaks: 0, status: 0 });
});
agreement('a leaked cluster (refcount 1, no reference): exit 3; -r leaks repairs it', async () => {
  const image = sample('leak.qcow2');
  const cs = headerOf(image).clusterSize;
  const clusters = Math.ceil(fs.statSync(image).size / cs);
  fs.truncateSync(image, (clusters + 1) * cs);
  patch(image, refcountEntry(image, clusters), [0, 1]);
  await agree(image, { corruptions: 0, leaks: 1, status: 3 });
  const r = await cliAsync('check', '-r', 'leaks', image);
  assert.is(r.status, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /1 leaked clusters/);
  assert.equal(qemuCheck(image), { corruptions: 0, leaks: 0, status: 0 });
});
agreement('a cluster in use with refcount 0: exit 2; -r leaks cannot fix it and fails (exit 1, as qemu-img), -r all does', async () => {
  const image = sample('low.qcow2');
  const cs = headerOf(image).clusterSize;
  const mapped = JSON.parse(qemuImg('map', '--output=json', image)) as Array<{ data: boolean; offset?: number }>;
  const host = mapped.find((m) => m.data && m.offset !== undefined)!.offset!;
  patch(image, refcountEntry(image, host / cs), [0, 0]);
  // qemu-img counts the refcount and the copied flag that no longer matches it: 2 errors.
  await agree(image, { corruptions: 2, leaks: 0, status: 2 });
  const leaksOnly = await cliAsync('check', '-r', 'leaks', image);
  assert.is(leaksOnly.status, 1);
  assert.match(leaksOnly.stderr, /repair with -r all/);
  const all = await cliAsync('check', '-r', 'all', image);
  assert.is(all.status, 0, all.stdout + all.stderr);
  assert.equal(qemuCheck(image), { corruptions: 0, leaks: 0, status: 0 });
});
agreement('an unaligned L2 entry is a corruption', async () => {
  const image = sample('unaligned.qcow2');
  const h = headerOf(image);
  const l2 = Number(readBytes(image, h.l1Offset, 8).readBigUInt64BE(0) & 0x00ff_ffff_ffff_fe00n);
  const entry = readBytes(image, l2, 8).readBigUInt64BE(0);
  const bad = Buffer.alloc(8);
  bad.writeBigUInt64BE(entry + 0x200n);
  patch(image, l2, [...bad]);
  const q = qemuCheck(image);
  const o = await ourCheck(image);
  assert.ok(q.corruptions > 0 && o.corruptions > 0, `${JSON.stringify(q)} ${o.stdout}`);
  assert.is(o.status, 2);
});
agreement('extended L2: an unallocated cluster with allocation bits is a corruption', async () => {
  const image = create(path.join(dir, 'bitmap.qcow2'), MiB, { extended_l2: true });
  qemuIo(image, ['write -P 1 0 64k', 'write -P 2 128k 2k']);
  const h = headerOf(image);
  const l2 = Number(readBytes(image, h.l1Offset, 8).readBigUInt64BE(0) & 0x00ff_ffff_ffff_fe00n);
  patch(image, l2 + 16 + 12, [0, 0, 0, 1]); // entry 1 (unallocated): allocation bit 0
  await agree(image, { corruptions: 1, leaks: 0, status: 2 });
});
agreement('a lazy-refcounts image left dirty: check -r all repairs it and clears the bit; then it can be written', async () => {
  const image = create(path.join(dir, 'lazy.qcow2'), 16 * MiB, { lazy_refcounts: true });
  qemuIo(image, ['write -P 1 0 1M']);
  // What a crash leaves: refcounts not yet written, the dirty bit set.
  const cs = headerOf(image).clusterSize;
  const mapped = JSON.parse(qemuImg('map', '--output=json', image)) as Array<{ data: boolean; offset?: number }>;
  const host = mapped.find((m) => m.data && m.offset !== undefined)!.offset!;
  patch(image, refcountEntry(image, host / cs), [0, 0]);
  patch(image, 72 + 7, [0x01]);
  const refused = await cliAsync('convert', '-n', '-O', 'qcow2', image, image);
  assert.is.not(refused.status, 0);
  assert.match(refused.stderr, /check -r all/);
  const r = await cliAsync('check', '-r', 'all', image);
  assert.is(r.status, 0, r.stdout + r.stderr);
  assert.is(readBytes(image, 72, 8).readBigUInt64BE(0) & 1n, 0n, 'dirty bit cleared');
  assert.equal(qemuCheck(image), { corruptions: 0, leaks: 0, status: 0 });
});
agreement('raw images: check says the format has no checks, exit 63 as qemu-img', async () => {
  const raw = path.join(dir, 'plain.raw');
  fs.writeFileSync(raw, Buffer.alloc(4096));
  const r = await cliAsync('check', raw);
  assert.is(r.status, 63);
  assert.match(r.stderr, /does not support checks/);
});
agreement('a full file system: a one-line ENOSPC error, and an image with leaks at worst', async () => {
  const mnt = fs.mkdtempSync(path.join('/tmp', 'blockconv-qcow2-full-'));
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mnt]);
  } catch {
    fs.rmdirSync(mnt);
    console.log('  (skipped: cannot mount a tmpfs here)');
    return;
  }
  try {
    const src = path.join(dir, 'full-source.raw');
    fs.writeFileSync(src, randomBytes(24 * MiB));
    const target = path.join(mnt, 'full.qcow2');
    const r = await cliAsync('convert', '-O', 'qcow2', src, target);
    assert.is.not(r.status, 0, 'the convert fails');
    assert.match(r.stderr, /no space left on device/i);
    assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
    const q = qemuCheck(target);
    assert.is(q.corruptions, 0, JSON.stringify(q));
    const fixed = await cliAsync('check', '-r', 'leaks', target);
    assert.is(fixed.status, 0, fixed.stdout + fixed.stderr);
    assert.equal(qemuCheck(target), { corruptions: 0, leaks: 0, status: 0 });
  } finally {
    execFileSync('umount', [mnt]);
    fs.rmdirSync(mnt);
  }
});
agreement.run();

// Crash safety: kill -9 at random moments of converts to qcow2.
const crash = suite('convert to qcow2 killed with SIGKILL: leaks at worst, repaired by check -r leaks');
const source = path.join(dir, 'crash-source.raw');
crash.before(() => {
  fs.writeFileSync(source, '');
  fs.truncateSync(source, 384 * MiB);
  // Data in most of it, in pieces, so that the copy takes a while and allocates many tables.
  const cmds: string[] = [];
  for (let i = 0; i < 96; i++) cmds.push(`write -P ${(i % 250) + 1} ${i * 4 * MiB} ${3 * MiB + (i % 7) * 65536}`);
  qemuIo(source, cmds, ['-f', 'raw']);
});

function killDuring(args: string[], delayMs: number): Promise<{ killed: boolean; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, 'convert', '--progress', 'json', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    let timer: NodeJS.Timeout | undefined;
    child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
    // The first progress line comes once the target exists: kill some time after it.
    child.stdout.once('data', () => { timer = setTimeout(() => child.kill('SIGKILL'), delayMs); });
    child.on('exit', (_code, signal) => { clearTimeout(timer); resolve({ killed: signal === 'SIGKILL', stderr }); });
  });
}

const runs: Array<{ options: string; extra: string[] }> = [
  { options: 'cluster_size=64k', extra: ['-m', '8', '-W'] },
  { options: 'cluster_size=4k', extra: ['-m', '8', '-W'] },
  { options: 'cluster_size=64k', extra: ['-m', '1'] },
  { options: 'cluster_size=4k,refcount_bits=64', extra: ['-m', '4'] },
  { options: 'cluster_size=512', extra: ['-m', '8', '-W'] },
  { options: 'extended_l2=on', extra: ['-m', '8', '-W'] },
  { options: 'compat=0.10,cluster_size=16k', extra: ['-m', '8'] },
  { options: 'cluster_size=64k', extra: ['-m', '16', '-W', '-t', 'unsafe'] },
  { options: 'cluster_size=8k', extra: ['-m', '8', '-W'] },
  { options: 'cluster_size=2k', extra: ['-m', '2', '-W'] },
  { options: 'cluster_size=64k,preallocation=metadata', extra: ['-m', '8', '-W'] },
  { options: 'cluster_size=1k', extra: ['-m', '8', '-W'] },
];
let killedRuns = 0;
runs.forEach((run, i) => {
  crash(`run ${i + 1}: -o ${run.options} ${run.extra.join(' ')}`, async () => {
    const target = path.join(dir, `crash-${i}.qcow2`);
    // Spread the kills over the copy, early to late; the rate limit (~310 MiB of data
    // at 128 MiB/s) makes its length about the same on any machine.
    const delay = [30, 150, 400, 800, 1200, 60, 250, 600, 1000, 100, 500, 1800][i]!;
    const r = await killDuring(['-O', 'qcow2', '-o', run.options, '-r', '128M', ...run.extra, source, target], delay);
    if (!r.killed) {
      // Finished before the kill: the image must then be complete.
      assert.equal(qemuCheck(target), { corruptions: 0, leaks: 0, status: 0 }, r.stderr);
      qemuImg('compare', source, target);
      return;
    }
    killedRuns++;
    const q = qemuCheck(target);
    assert.is(q.corruptions, 0, `qemu-img check after kill -9: ${JSON.stringify(q)}`);
    assert.ok(q.status === 0 || q.status === 3, `qemu-img check exit ${q.status}`);
    const fixed = await cliAsync('check', '-r', 'leaks', target);
    assert.is(fixed.status, 0, fixed.stdout + fixed.stderr);
    assert.equal(qemuCheck(target), { corruptions: 0, leaks: 0, status: 0 });
    fs.rmSync(target);
  });
});
crash('at least 10 runs were killed before the copy finished', () => {
  assert.ok(killedRuns >= 10, `${killedRuns} of ${runs.length} runs were killed mid-copy`);
});
crash.run();

