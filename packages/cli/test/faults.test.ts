/**
 * Server and network faults in the lab (tools/lab.sh: NFS-Ganesha and tgtd in their own
 * network namespaces behind tbf-shaped veth links), through the blockconv command:
 * - slow links: 8 Mbit/s with more queued than the timeout can move never trips it
 *   (the timeout is a stall timeout: no byte moving for that long);
 * - a link dropped mid-copy, a server killed for good: one line naming the server and
 *   the offset, exit 1, within the timeout and a little, and no "done" reported;
 * - a server restarted within a few seconds: the iSCSI session reconnects and the copy
 *   finishes identical; NFS fails cleanly within the bound (libnfs 4.0's reconnect
 *   loses its place in the reply stream; see docs/RELIABILITY.md).
 * Figures (seconds from the fault to the exit) with BLOCKCONV_FAULT_REPORT=FILE (one
 * JSON line each; tools/fault-campaign.sh). BLOCKCONV_FAULT_TIMEOUT sets the timeout
 * option (default 3 s; "default" leaves the drivers' own, 30 s), BLOCKCONV_FAULT_RATE the
 * links' rate (default 8mbit).
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import * as assert from 'uvu/assert';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const BIN = join(ROOT, 'packages', 'cli', 'bin', 'blockconv.js');
const LAB = join(ROOT, 'tools', 'lab.sh');
const MiB = 1024 * 1024;
const RATE = process.env.BLOCKCONV_FAULT_RATE ?? '8mbit';
const TIMEOUT_S =
  process.env.BLOCKCONV_FAULT_TIMEOUT === 'default' ? 30 : Number(process.env.BLOCKCONV_FAULT_TIMEOUT ?? 3);
const TIMEOUT_OPT = process.env.BLOCKCONV_FAULT_TIMEOUT === 'default' ? [] : [`timeout=${TIMEOUT_S}`];
const REPORT = process.env.BLOCKCONV_FAULT_REPORT;
/** What a failure may take past the timeout: the 100 ms stall tick, the in-order writer settling, exit. */
const SLACK_S = 3;

interface Lab {
  nfsUrl: string;
  exportDir: string;
  iscsiUrl: string;
  lunFile: string;
  nfsIf: string;
  iscsiIf: string;
  ganeshaPid: number;
  tgtdPid: number;
}

function lab(): Lab {
  const env = Object.fromEntries(
    execFileSync('bash', [LAB, 'env'], { encoding: 'utf8' })
      .trim()
      .split('\n')
      .map((l) => l.split('=') as [string, string]),
  );
  return {
    nfsUrl: env.LAB_NFS_URL!,
    exportDir: env.LAB_NFS_EXPORT_DIR!,
    iscsiUrl: env.LAB_ISCSI_URL!,
    lunFile: env.LAB_LUN_FILE!,
    nfsIf: env.LAB_NFS_IF!,
    iscsiIf: env.LAB_ISCSI_IF!,
    ganeshaPid: Number(env.LAB_GANESHA_PID),
    tgtdPid: Number(env.LAB_TGTD_PID),
  };
}

function labUp(): Lab {
  execFileSync('bash', [LAB, 'up', '--rate', RATE], { stdio: ['ignore', 'ignore', 'inherit'], timeout: 120_000 });
  return lab();
}

let L: Lab;
let work = '';
let source = '';
let sourceHash = '';
const SIZE = 12 * MiB;

function sha(file: string, length = SIZE): string {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    fs.readSync(fd, b, 0, length, 0);
    return crypto.createHash('sha256').update(b).digest('hex');
  } finally {
    fs.closeSync(fd);
  }
}

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  endedAt: number;
}

/** The command in the background; `fault` runs `at` ms after it starts. */
function blockconv(args: string[], fault?: { at: number; run: () => void }): Promise<Run & { faultAt?: number }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let faultAt: number | undefined;
    child.stdout.on('data', (d: Buffer) => {
      stdout += d;
    });
    child.stderr.on('data', (d: Buffer) => {
      stderr += d;
    });
    const timer = fault
      ? setTimeout(() => {
          faultAt = performance.now();
          fault.run();
        }, fault.at)
      : undefined;
    // A hang is a failure of its own, not a stuck test: 4 minutes is far past any bound here.
    const hang = setTimeout(() => child.kill('SIGKILL'), 240_000);
    child.on('close', (code) => {
      clearTimeout(timer);
      clearTimeout(hang);
      resolve({ code, stdout, stderr, endedAt: performance.now(), faultAt });
    });
  });
}

function report(row: Record<string, unknown>): void {
  if (REPORT) fs.appendFileSync(REPORT, `${JSON.stringify({ timeoutS: TIMEOUT_S, rate: RATE, ...row })}\n`);
}

/** A failed run: exit 1, one line naming what and where, nothing reported done, within the bound. */
function assertCleanFailure(r: Run & { faultAt?: number }, what: RegExp, scenario: string): number {
  assert.is(r.code, 1, `${scenario}: exit ${r.code}: ${r.stderr}`);
  const lines = r.stderr
    .trim()
    .split('\n')
    .filter((l) => !l.startsWith('blockconv: note: '));
  assert.is(lines.length, 1, `${scenario}: one line: ${r.stderr}`);
  assert.match(lines[0]!, what, scenario);
  assert.match(lines[0]!, /at offset \d+/, `${scenario}: names the offset: ${lines[0]}`);
  assert.not.match(r.stdout, /"event":"done"/, `${scenario}: nothing reported done`);
  assert.ok(r.faultAt !== undefined, `${scenario}: the fault happened before the copy ended`);
  const took = (r.endedAt - r.faultAt!) / 1000;
  assert.ok(
    took <= TIMEOUT_S + SLACK_S,
    `${scenario}: failed ${took.toFixed(1)} s after the fault (bound ${TIMEOUT_S} + ${SLACK_S} s)`,
  );
  report({ scenario, outcome: 'clean failure', secondsAfterFault: Number(took.toFixed(2)), message: lines[0] });
  return took;
}

const link = (ifname: string, state: 'up' | 'down'): void => {
  execFileSync('ip', ['link', 'set', ifname, state]);
};

/** Whether the lab was up before: if not, the test takes it down again. */
let wasUp = false;

test.before(() => {
  wasUp = spawnSync('bash', [LAB, 'status'], { stdio: 'ignore' }).status === 0;
  L = labUp();
  work = fs.mkdtempSync('/dev/shm/blockconv-faults-');
  source = join(work, 'source.raw');
  fs.writeFileSync(source, crypto.randomBytes(SIZE));
  sourceHash = sha(source);
  fs.copyFileSync(source, join(L.exportDir, 'faults-source.raw'));
});

test.after(() => {
  // Leave the lab as a later test or benchmark expects it: links up, servers serving.
  try {
    link(L.nfsIf, 'up');
    link(L.iscsiIf, 'up');
  } catch {
    /* already up */
  }
  try {
    if (wasUp) labUp();
    else execFileSync('bash', [LAB, 'down'], { stdio: 'ignore', timeout: 60_000 });
  } catch {
    /* reported by the test that broke it */
  }
  fs.rmSync(join(L.exportDir, 'faults-source.raw'), { force: true });
  fs.rmSync(work, { recursive: true, force: true });
});

const nfsRead = (out: string, extra: string[] = []): string[] => [
  'convert',
  '--output',
  'json',
  ...(TIMEOUT_OPT.length ? ['--source-opts', TIMEOUT_OPT.join(',')] : []),
  ...extra,
  '-O',
  'raw',
  `${L.nfsUrl}/faults-source.raw`,
  out,
];
const lunWrite = (extra: string[] = []): string[] => [
  'convert',
  '-n',
  '--output',
  'json',
  ...(TIMEOUT_OPT.length ? ['--target-opts', TIMEOUT_OPT.join(',')] : []),
  ...extra,
  '-O',
  'raw',
  source,
  L.iscsiUrl,
];

test(`slow link (${RATE}): an NFS read with ${TIMEOUT_S} s of timeout and more queued than that moves completes`, async () => {
  const out = join(work, 'slow-nfs.raw');
  const started = performance.now();
  const r = await blockconv(nfsRead(out));
  assert.is(r.code, 0, r.stderr);
  assert.is(sha(out), sourceHash);
  report({
    scenario: 'NFS read on a slow link',
    outcome: 'completed, identical',
    seconds: Number(((r.endedAt - started) / 1000).toFixed(2)),
  });
});

test(`slow link (${RATE}): a LUN write likewise`, async () => {
  fs.writeFileSync(L.lunFile, Buffer.alloc(0));
  execFileSync('truncate', ['-s', '2G', L.lunFile]);
  const started = performance.now();
  const r = await blockconv(lunWrite());
  assert.is(r.code, 0, r.stderr);
  assert.is(sha(L.lunFile), sourceHash);
  report({
    scenario: 'LUN write on a slow link',
    outcome: 'completed, identical',
    seconds: Number(((r.endedAt - started) / 1000).toFixed(2)),
  });
});

test('NFS link dropped mid-copy: a clean error naming the server and the offset, within the timeout', async () => {
  const r = await blockconv(nfsRead(join(work, 'drop-nfs.raw')), { at: 3000, run: () => link(L.nfsIf, 'down') });
  link(L.nfsIf, 'up');
  assertCleanFailure(r, /no answer from the NFS server 198\.18\.0\.2 for \d+ s/, 'NFS link dropped');
});

test('iSCSI link dropped mid-copy: likewise', async () => {
  const r = await blockconv(lunWrite(), { at: 3000, run: () => link(L.iscsiIf, 'down') });
  link(L.iscsiIf, 'up');
  assertCleanFailure(r, /no answer from the iSCSI target 198\.18\.0\.6:3260 for \d+ s/, 'iSCSI link dropped');
});

test('NFS server killed for good mid-copy: likewise', async () => {
  const r = await blockconv(nfsRead(join(work, 'dead-nfs.raw')), {
    at: 3000,
    run: () => process.kill(L.ganeshaPid, 'SIGKILL'),
  });
  assertCleanFailure(r, /NFS server 198\.18\.0\.2/, 'NFS server killed');
  L = labUp();
});

test('iSCSI target killed for good mid-copy: likewise', async () => {
  const r = await blockconv(lunWrite(), { at: 3000, run: () => process.kill(L.tgtdPid, 'SIGKILL') });
  assertCleanFailure(r, /iSCSI target 198\.18\.0\.6:3260/, 'iSCSI target killed');
  L = labUp();
});

test('iSCSI target restarted within a few seconds: the session reconnects and the copy finishes identical', async () => {
  fs.writeFileSync(L.lunFile, Buffer.alloc(0));
  execFileSync('truncate', ['-s', '2G', L.lunFile]);
  const pid = L.tgtdPid;
  let restartedAfter = 0;
  const r = await blockconv(
    lunWrite(process.env.BLOCKCONV_FAULT_TIMEOUT === 'default' ? [] : ['--target-opts', 'timeout=20']),
    {
      at: 3000,
      run: () => {
        process.kill(pid, 'SIGKILL');
        const t = performance.now();
        L = labUp();
        restartedAfter = (performance.now() - t) / 1000;
      },
    },
  );
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stdout, /"event":"done"/);
  assert.is(sha(L.lunFile), sourceHash, 'the LUN holds the source');
  report({
    scenario: 'iSCSI target restarted',
    outcome: 'rode through, identical',
    restartSeconds: Number(restartedAfter.toFixed(2)),
  });
});

test('NFS server restarted within a few seconds: a clean failure within the bound (or a verified copy)', async () => {
  const out = join(work, 'restart-nfs.raw');
  const pid = L.ganeshaPid;
  const r = await blockconv(nfsRead(out), {
    at: 3000,
    run: () => {
      process.kill(pid, 'SIGKILL');
      setTimeout(() => {
        L = labUp();
      }, 500);
    },
  });
  if (r.code === 0) {
    assert.is(sha(out), sourceHash, 'a copy that rode through is identical');
    report({ scenario: 'NFS server restarted', outcome: 'rode through, identical' });
  } else {
    assertCleanFailure(r, /NFS server 198\.18\.0\.2/, 'NFS server restarted');
  }
  L = labUp();
});

// The peer, side by side (campaign only: BLOCKCONV_FAULT_QEMU=1): qemu-img through the same faults.
if (process.env.BLOCKCONV_FAULT_QEMU) {
  const qemu = (
    args: string[],
    fault: () => void,
    restore: () => void,
  ): Promise<{ code: number | null; seconds: number | undefined }> =>
    new Promise((resolve) => {
      const child = spawn('qemu-img', args, { stdio: ['ignore', 'ignore', 'pipe'] });
      let faultAt = 0;
      const t = setTimeout(() => {
        faultAt = performance.now();
        fault();
      }, 3000);
      const cap = setTimeout(() => child.kill('SIGKILL'), 183_000);
      child.on('close', (code, signal) => {
        clearTimeout(t);
        clearTimeout(cap);
        restore();
        resolve({ code: signal ? null : code, seconds: faultAt ? (performance.now() - faultAt) / 1000 : undefined });
      });
    });
  test('qemu-img, NFS link dropped mid-copy (for comparison)', async () => {
    const r = await qemu(
      ['convert', '-O', 'raw', `${L.nfsUrl}/faults-source.raw`, join(work, 'qemu-drop.raw')],
      () => link(L.nfsIf, 'down'),
      () => link(L.nfsIf, 'up'),
    );
    report({
      scenario: 'qemu-img: NFS link dropped',
      outcome: r.code === null ? 'no exit in 180 s (killed)' : `exit ${r.code}`,
      secondsAfterFault: r.seconds && Number(r.seconds.toFixed(2)),
    });
  });
  test('qemu-img, iSCSI link dropped mid-copy (for comparison)', async () => {
    const r = await qemu(
      ['convert', '-n', '-O', 'raw', source, L.iscsiUrl],
      () => link(L.iscsiIf, 'down'),
      () => link(L.iscsiIf, 'up'),
    );
    report({
      scenario: 'qemu-img: iSCSI link dropped',
      outcome: r.code === null ? 'no exit in 180 s (killed)' : `exit ${r.code}`,
      secondsAfterFault: r.seconds && Number(r.seconds.toFixed(2)),
    });
  });
}

test.run();
