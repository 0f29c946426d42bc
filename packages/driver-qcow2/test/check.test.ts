/**
 * `blockconv check` against `qemu-img check`, the reference: on every damaged image
 * the tests make (corrupt-images.ts: those reading refuses, and those a check must
 * judge, the refcount structure misplaced in every way among them), both tools must
 * exit with the same code and report the same counts, and where the image is
 * repaired, repair it alike (qemu-img then judging blockconv's result). Then the
 * crash-safety claim of the write side: a convert to qcow2 killed with SIGKILL at
 * random moments leaves an image with leaks at worst, which `check -r leaks` repairs.
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import {
  checkCases,
  dataCluster,
  openFailures,
  refcountEntry,
  sample,
  type CorruptImage,
  type Verdict,
} from './corrupt-images.js';
import {
  CLI,
  MiB,
  cliAsync,
  create,
  headerOf,
  patch,
  qemuImg,
  qemuIo,
  readBytes,
  removeDir,
  tempDir,
  u64,
} from './helpers.js';

const dir = tempDir('blockconv-qcow2-check-');
process.on('exit', () => removeDir(dir));

type Repair = 'leaks' | 'all';

/** A check's answer: exit code, the report's counts (absent: no report), the repairs it made. */
interface Answer {
  status: number;
  report?: { corruptions: number; leaks: number; checkErrors: number; corruptionsFixed: number; leaksFixed: number };
  stderr: string;
}

function parseReport(stdout: string): Answer['report'] {
  if (!stdout.trim()) return undefined;
  const j = JSON.parse(stdout) as Record<string, number | undefined>;
  // qemu-img leaves out the counts that are 0.
  return {
    corruptions: j.corruptions ?? 0,
    leaks: j.leaks ?? 0,
    checkErrors: j['check-errors'] ?? 0,
    corruptionsFixed: j['corruptions-fixed'] ?? 0,
    leaksFixed: j['leaks-fixed'] ?? 0,
  };
}

function qemuCheck(image: string, repair?: Repair): Answer {
  const args = ['check', '--output=json', ...(repair ? ['-r', repair] : []), image];
  try {
    // Problems are listed one line each on stderr: there may be hundreds of thousands.
    const out = execFileSync('qemu-img', args, {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
      maxBuffer: 64 * MiB,
      timeout: 120_000,
    });
    return { status: 0, report: parseReport(out), stderr: '' };
  } catch (err) {
    const e = err as { stdout?: string; status?: number | null; signal?: string };
    if (e.status === null || e.status === undefined)
      throw new Error(`qemu-img check did not finish (${e.signal ?? 'no status'})`);
    return { status: e.status, report: parseReport(String(e.stdout ?? '')), stderr: '' };
  }
}

async function ourCheck(image: string, repair?: Repair): Promise<Answer> {
  const r = await cliAsync('check', '--output', 'json', ...(repair ? ['-r', repair] : []), image);
  return { status: r.status, report: parseReport(r.stdout), stderr: r.stderr };
}

/** The answer against a pinned verdict: the exit code, whether there is a report, the counts it pins. */
function matches(a: Answer, v: Verdict, who: string): void {
  assert.is(a.status, v.status, `${who}: exit code`);
  assert.is(a.report !== undefined, v.report !== false, `${who}: ${v.report === false ? 'no report' : 'a report'}`);
  for (const key of ['corruptions', 'leaks', 'checkErrors'] as const) {
    if (v[key] !== undefined) assert.is(a.report?.[key], v[key], `${who}: ${key}`);
  }
}

/** A check that could not be completed: no report, and one line on stderr naming what is wrong. */
function failsWithOneLine(a: Answer): void {
  const lines = a.stderr.trim().split('\n');
  assert.is(lines.length, 1, a.stderr);
  assert.match(lines[0]!, /field \S+/, 'the error names the field or table');
}

function copy(image: string, suffix: string): string {
  const to = `${image}.${suffix}`;
  fs.copyFileSync(image, to);
  return to;
}

async function compare(c: CorruptImage, image: string, repair?: Repair): Promise<void> {
  const what = `${c.name}${repair ? ` (-r ${repair})` : ''}`;
  const theirs = copy(image, `qemu-${repair ?? 'check'}`);
  const ours = copy(image, `ours-${repair ?? 'check'}`);
  const q = c.ours?.qemuHangs ? undefined : qemuCheck(theirs, repair);
  const o = await ourCheck(ours, repair);
  if (q && !repair) matches(q, c.qemu, `qemu-img check: ${what}`);
  if (c.ours && !repair) {
    matches(o, c.ours, `blockconv check (${c.ours.why}): ${what}`);
  } else {
    assert.ok(q, what);
    assert.is(o.status, q.status, `exit code: ${what}: ${o.stderr}`);
    const fixedDiffer = repair && c.repairDiffers;
    assert.equal(
      fixedDiffer ? { ...o.report, corruptionsFixed: 0 } : o.report,
      fixedDiffer ? { ...q.report, corruptionsFixed: 0 } : q.report,
      `report: ${what}`,
    );
  }
  if (!o.report) failsWithOneLine(o);
  if (repair && q) {
    // qemu-img judges the image blockconv repaired as it judges its own.
    const after = qemuCheck(ours);
    const own = qemuCheck(theirs);
    assert.equal(
      { status: after.status, report: after.report },
      { status: own.status, report: own.report },
      `after the repair: ${what}`,
    );
  }
  fs.rmSync(theirs);
  fs.rmSync(ours);
}

/** Exit code and counts, for images whose checks always report. */
function summary(a: Answer): { corruptions: number; leaks: number; status: number } {
  assert.ok(a.report, `no report (exit ${a.status}): ${a.stderr}`);
  return { corruptions: a.report.corruptions, leaks: a.report.leaks, status: a.status };
}

const table = suite('check answers as qemu-img check does, on every damaged image');
for (const c of [...openFailures, ...checkCases]) {
  table(c.name, async () => {
    const { image } = c.make(dir);
    await compare(c, image);
    for (const repair of c.repair ?? []) await compare(c, image, repair);
  });
}
table.run();

const agreement = suite('check: what qemu-img check does not show');
agreement("a leaked cluster: -r leaks reports the repair in qemu-img's words", async () => {
  const image = sample(dir);
  const cs = headerOf(image).clusterSize;
  const clusters = Math.ceil(fs.statSync(image).size / cs);
  fs.truncateSync(image, (clusters + 1) * cs);
  patch(image, refcountEntry(image, clusters), [0, 1]);
  const r = await cliAsync('check', '-r', 'leaks', image);
  assert.is(r.status, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /1 leaked clusters/);
  assert.equal(qemuCheck(image), {
    status: 0,
    report: { corruptions: 0, leaks: 0, checkErrors: 0, corruptionsFixed: 0, leaksFixed: 0 },
    stderr: '',
  });
});
agreement(
  'a lazy-refcounts image left dirty: writing refused until check -r all repairs it and clears the bit',
  async () => {
    const image = create(path.join(dir, 'lazy.qcow2'), 16 * MiB, { lazy_refcounts: true });
    qemuIo(image, ['write -P 1 0 1M']);
    // What a crash leaves: refcounts not yet written, the dirty bit set.
    patch(image, refcountEntry(image, dataCluster(image) / headerOf(image).clusterSize), [0, 0]);
    patch(image, 72 + 7, [0x01]);
    const refused = await cliAsync('convert', '-n', '-O', 'qcow2', image, image);
    assert.is.not(refused.status, 0);
    assert.match(refused.stderr, /check -r all/);
    const r = await cliAsync('check', '-r', 'all', image);
    assert.is(r.status, 0, r.stdout + r.stderr);
    assert.is(readBytes(image, 72, 8).readBigUInt64BE(0) & 1n, 0n, 'dirty bit cleared');
    assert.is(qemuCheck(image).status, 0);
  },
);
agreement(
  'tables of garbage: a problem per entry counted, the lines kept bounded (found by the fuzz campaign)',
  async () => {
    // 2 MiB clusters: an L2 table has 262144 entries. L1[0] made to point at a data cluster
    // full of 0x11 bytes: every "entry" is a corruption (qemu-img counts them all too).
    const image = path.join(dir, 'garbage-l2.qcow2');
    create(image, 8 * MiB, { cluster_size: 2 * MiB });
    qemuIo(image, ['write -P 0x11 2M 2M']);
    const map = JSON.parse(qemuImg('map', '--output=json', image)) as Array<{
      start: number;
      offset?: number;
      data: boolean;
    }>;
    const host = map.find((e) => e.data && e.start === 2 * MiB)!.offset!;
    const h = headerOf(image);
    patch(
      image,
      h.l1Offset,
      u64(host).map((b, i) => (i === 0 ? b | 0x80 : b)),
    ); // with COPIED
    const ours = await ourCheck(image);
    const q = qemuCheck(image);
    assert.equal(summary(ours), summary(q));
    assert.ok(ours.report!.corruptions > 100_000, `${ours.report!.corruptions} corruptions`);
    const human = await cliAsync('check', image);
    const lines = (human.stdout + human.stderr).split('\n');
    assert.ok(lines.length < 10_100, `${lines.length} lines`);
    assert.match(human.stdout + human.stderr, /\.\.\. and \d+ more lines like these \(the counts above include them\)/);
    assert.not.match(human.stderr, /Maximum call stack/);
  },
);

agreement('raw images: check says the format has no checks, exit 63 as qemu-img', async () => {
  const raw = path.join(dir, 'plain.raw');
  fs.writeFileSync(raw, Buffer.alloc(4096));
  const r = await cliAsync('check', raw);
  assert.is(r.status, 63);
  assert.match(r.stderr, /does not support checks/);
  assert.is(qemuCheck(raw).status, 63);
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
    const q = summary(qemuCheck(target));
    assert.is(q.corruptions, 0, JSON.stringify(q));
    const fixed = await cliAsync('check', '-r', 'leaks', target);
    assert.is(fixed.status, 0, fixed.stdout + fixed.stderr);
    assert.equal(summary(qemuCheck(target)), { corruptions: 0, leaks: 0, status: 0 });
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
    const child = spawn(process.execPath, [CLI, 'convert', '--progress', 'json', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    let timer: NodeJS.Timeout | undefined;
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    // The first progress line comes once the target exists: kill some time after it.
    child.stdout.once('data', () => {
      timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
    });
    child.on('exit', (_code, signal) => {
      clearTimeout(timer);
      resolve({ killed: signal === 'SIGKILL', stderr });
    });
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
      assert.equal(summary(qemuCheck(target)), { corruptions: 0, leaks: 0, status: 0 }, r.stderr);
      qemuImg('compare', source, target);
      return;
    }
    killedRuns++;
    const q = summary(qemuCheck(target));
    assert.is(q.corruptions, 0, `qemu-img check after kill -9: ${JSON.stringify(q)}`);
    assert.ok(q.status === 0 || q.status === 3, `qemu-img check exit ${q.status}`);
    assert.equal(summary(await ourCheck(target)), q, 'blockconv check answers as qemu-img check');
    const fixed = await cliAsync('check', '-r', 'leaks', target);
    assert.is(fixed.status, 0, fixed.stdout + fixed.stderr);
    assert.equal(summary(qemuCheck(target)), { corruptions: 0, leaks: 0, status: 0 });
    fs.rmSync(target);
  });
});
crash('at least 10 runs were killed before the copy finished', () => {
  assert.ok(killedRuns >= 10, `${killedRuns} of ${runs.length} runs were killed mid-copy`);
});
crash.run();
