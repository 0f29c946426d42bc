/**
 * Batches on real servers: three `blockconv worker` processes on the loopback Redis,
 * templates and targets on the loopback NFS-Ganesha, a CHAP LUN on tgtd, the dashboard
 * in Debian's chromium.
 * - 12 targets from one qcow2 template on NFS, two targets per job (read once): all
 *   complete, each target reads back with the template's checksum;
 * - a cap of 2 on the NFS server: at most 2 jobs hold it (Redis) or run (worker logs),
 *   and the server sees at most 2 jobs' connections; local jobs are not held up by it;
 * - Redis restarted mid-batch: the batch completes, no job lost, no target written by
 *   two workers at once;
 * - a CHAP password named by reference never reaches Redis or the logs;
 * - the dashboard shows a running job's progress and a failed job's reason.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Queue } from 'bullmq';
import { Redis } from 'ioredis';
import { CONVERT_QUEUE, CAPS_KEY, capHolders, type ConvertJobSummary } from '../src/index.js';
import { REDIS_URL, ensureServer as ensureRedis, restartServer } from '../../../tools/test/redis-server.js';
import { BASE_URL, EXPORT_DIR, ensureServer as ensureNfs } from '../../../tools/test/nfs-server.js';
import {
  CHAP_USER,
  IQN,
  LUNS,
  PORTAL,
  chapPassword,
  ensureServer as ensureIscsi,
} from '../../../tools/test/iscsi-server.js';
import { BIN, FleetProcesses } from './helpers.js';

ensureRedis();
ensureNfs();
ensureIscsi();
const MiB = 1024 * 1024;
const dir = fs.mkdtempSync(join(process.env.BLOCKCONV_TEST_DIR ?? tmpdir(), 'blockconv-fleet-batch-'));
const sub = `fleet-batch-${process.pid}`;
const nfsDir = join(EXPORT_DIR, sub);
const nfsUrl = (name: string): string => `${BASE_URL}/${sub}/${name}`;
const fleet = new FleetProcesses({
  ...process.env,
  BLOCKCONV_REDIS: REDIS_URL,
  BLOCKCONV_STATE_DIR: join(dir, 'state'),
});
let digest = '';
let rawDigest = '';
const local = join(dir, 'local.raw');

function checksumOf(location: string, ...flags: string[]): string {
  const r = fleet.cli(['checksum', '--output', 'json', ...flags, location]);
  assert.is(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as { checksum: string }).checksum;
}

function writeBatch(name: string, batch: object): string {
  const f = join(dir, name);
  fs.writeFileSync(f, JSON.stringify(batch));
  return f;
}

async function resetQueue(): Promise<void> {
  const q = new Queue(CONVERT_QUEUE, { connection: { url: REDIS_URL, maxRetriesPerRequest: null } });
  await q.obliterate({ force: true });
  await q.close();
  const r = new Redis(REDIS_URL);
  await r.del(CAPS_KEY);
  r.disconnect();
}

/** Server-side TCP connections of the NFS server (port 2049) established now. */
function nfsConnections(): number {
  const out = execFileSync('ss', ['-Htn', 'state', 'established', '( sport = :2049 )'], { encoding: 'utf8' });
  return out.split('\n').filter((l) => l.trim()).length;
}

test.before(async () => {
  await resetQueue();
  fs.mkdirSync(nfsDir, { recursive: true });
  const template = join(nfsDir, 'template.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', template, '96M']);
  execFileSync(
    'qemu-io',
    ['-f', 'qcow2', '-c', 'write -P 0x21 0 12M', '-c', 'write -P 0x42 40M 20M', '-c', 'write -z 70M 4M', template],
    { stdio: 'ignore' },
  );
  digest = checksumOf(template);
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', local, '32M']);
  execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 8M', local], { stdio: 'ignore' });
  rawDigest = checksumOf(local);
  await Promise.all(['b1', 'b2', 'b3'].map((n) => fleet.startWorker(n, ['--concurrency', '2'])));
});

test.after(async () => {
  await fleet.stopAll();
  await resetQueue();
  fs.rmSync(dir, { recursive: true, force: true });
  fs.rmSync(nfsDir, { recursive: true, force: true });
});

test("3 workers, a batch of 12 NFS targets from one template, 2 per job (read once): all complete with the template's checksum", async () => {
  const batch = writeBatch('twelve.json', {
    source: nfsUrl('template.qcow2'),
    sourceFormat: 'qcow2',
    options: { targetFormat: 'raw' },
    targets: Array.from({ length: 12 }, (_, i) => nfsUrl(`t${i}.raw`)),
    targetsPerJob: 2,
  });
  const r = await fleet.cliAsync(['submit', '--batch', batch, '--wait', '--output', 'json']);
  assert.is(r.code, 0, r.stderr);
  const jobs = JSON.parse(r.stdout) as ConvertJobSummary[];
  assert.is(jobs.length, 6);
  for (const j of jobs) {
    assert.is(j.state, 'completed');
    assert.is(j.result?.checksum, digest);
    assert.equal(
      j.result?.targets?.map((t) => t.ok),
      [true, true],
    );
  }
  assert.ok(new Set(jobs.map((j) => j.result!.worker)).size >= 2, 'spread over the workers');
  for (let i = 0; i < 12; i++) {
    assert.is(
      checksumOf(nfsUrl(`t${i}.raw`), '-f', 'raw'),
      digest,
      `t${i}.raw reads back with the template's checksum`,
    );
    execFileSync('qemu-img', [
      'compare',
      '-q',
      '-f',
      'qcow2',
      '-F',
      'raw',
      join(nfsDir, 'template.qcow2'),
      join(nfsDir, `t${i}.raw`),
    ]);
  }
  for (let i = 0; i < 12; i++) fs.rmSync(join(nfsDir, `t${i}.raw`));
});

test('a cap of 2 on the NFS server holds across workers (Redis slots, worker logs, server connections); local jobs are not held up', async () => {
  // One job alone: how many connections the server sees for one job.
  const base = nfsConnections();
  let alone = 0;
  const one = fleet.cliAsync([
    'submit',
    '--wait',
    '-f',
    'qcow2',
    '-r',
    String(40 * MiB),
    nfsUrl('template.qcow2'),
    nfsUrl('alone.raw'),
  ]);
  let running = true;
  void one.then(() => {
    running = false;
  });
  while (running) {
    alone = Math.max(alone, nfsConnections() - base);
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.is((await one).code, 0);
  assert.ok(alone >= 1, `a job's connections are seen on the server (${alone})`);

  const batch = writeBatch('capped.json', {
    source: nfsUrl('template.qcow2'),
    sourceFormat: 'qcow2',
    options: { rateLimit: 40 * MiB },
    targets: Array.from({ length: 6 }, (_, i) => nfsUrl(`c${i}.raw`)),
    caps: { 'nfs://127.0.0.1': 2 },
  });
  const from = fleet.events.length;
  const submitted = fleet.cliAsync(['submit', '--batch', batch, '--wait', '--output', 'json']);
  let maxHolders = 0;
  let maxConnections = 0;
  let done = false;
  void submitted.then(() => {
    done = true;
  });
  const redis = new Redis(REDIS_URL);
  let localJobs: Promise<{ code: number | null; stdout: string }> | undefined;
  try {
    while (!done) {
      maxHolders = Math.max(maxHolders, (await capHolders(redis, 'nfs://127.0.0.1')).length);
      maxConnections = Math.max(maxConnections, nfsConnections() - base);
      // Once the capped jobs hold their slots, local jobs go past them.
      if (!localJobs && maxHolders === 2)
        localJobs = fleet.cliAsync(['submit', '--wait', '--output', 'json', local, join(dir, 'local-copy.raw')]);
      await new Promise((r) => setTimeout(r, 50));
    }
  } finally {
    redis.disconnect();
  }
  const r = await submitted;
  assert.is(r.code, 0, r.stderr);
  const events = fleet.events.slice(from);
  const nfsEvent = (e: { target: string }): boolean => e.target.includes(`/${sub}/c`);
  assert.is(maxHolders, 2, "two jobs held the server's slots at most (and the cap was reached)");
  const ranAtOnce = fleet.maxConcurrent((e) => events.includes(e) && nfsEvent(e));
  assert.is(ranAtOnce, 2, "two capped jobs ran at once at most per the workers' logs (of 6 slots)");
  if (process.env.BLOCKCONV_FLEET_REPORT)
    console.log(
      `  cap 2: slots held at most ${maxHolders}, jobs at once ${ranAtOnce}, server connections at most ${maxConnections} (one job alone: ${alone})`,
    );
  assert.ok(
    maxConnections <= 2 * alone,
    `the server saw ${maxConnections} connections at most: two jobs' worth (${alone} each)`,
  );
  const l = await localJobs!;
  assert.is(l.code, 0);
  const localJob = (JSON.parse(l.stdout) as ConvertJobSummary[])[0]!;
  assert.is(localJob.result?.checksum, rawDigest);
  const lastNfsStart = Math.max(...events.filter((e) => nfsEvent(e) && e.event === 'start').map((e) => e.at));
  const localStart = events.find((e) => e.target.endsWith('local-copy.raw') && e.event === 'start')!.at;
  assert.ok(localStart < lastNfsStart, 'the local job ran while NFS jobs still waited for their cap');
  for (const j of JSON.parse(r.stdout) as ConvertJobSummary[]) assert.is(j.result?.checksum, digest);
});

test('Redis restarted mid-batch: no job lost, no target written by two workers at once, the batch completes', async () => {
  const batch = writeBatch('restart.json', {
    source: nfsUrl('template.qcow2'),
    sourceFormat: 'qcow2',
    options: { rateLimit: 12 * MiB, checkpointBytes: 8 * MiB },
    targets: Array.from({ length: 6 }, (_, i) => nfsUrl(`r${i}.raw`)),
  });
  const from = fleet.events.length;
  const submitted = fleet.cliAsync(['submit', '--batch', batch, '--wait', '--output', 'json']);
  // Restart once jobs run (a worker has logged a start of this batch).
  for (let i = 0; i < 200 && !fleet.events.slice(from).some((e) => e.event === 'start'); i++)
    await new Promise((r) => setTimeout(r, 50));
  await new Promise((r) => setTimeout(r, 500));
  const restartAt = Date.now();
  restartServer();
  const r = await submitted;
  assert.is(r.code, 0, r.stderr);
  const jobs = JSON.parse(r.stdout) as ConvertJobSummary[];
  assert.is(jobs.length, 6);
  for (const j of jobs) assert.is(j.result?.checksum, digest, `job ${j.id}`);
  const ends = fleet.events.slice(from).filter((e) => e.event !== 'start');
  assert.ok(
    ends.some((e) => e.at > restartAt + 1000),
    'jobs were still running when Redis restarted',
  );
  if (process.env.BLOCKCONV_FLEET_REPORT)
    console.log(
      `  restart: ${fleet.events.slice(from).length} events, attempts ${jobs.map((j) => j.attemptsMade).join(' ')}, resumed ${jobs.map((j) => j.result?.resumedFrom ?? 0).join(' ')}`,
    );
  for (let i = 0; i < 6; i++) {
    const target = nfsUrl(`r${i}.raw`);
    const mine = fleet.events.slice(from).filter((e) => e.target === target);
    // Attempts on one target never overlap: each start is followed by its end or failure before the next start.
    let open = 0;
    for (const e of mine.sort((a, b) => a.at - b.at)) {
      open += e.event === 'start' ? 1 : -1;
      assert.ok(open <= 1, `${target}: two attempts at once (${JSON.stringify(mine)})`);
    }
    assert.is(checksumOf(target, '-f', 'raw'), digest);
  }
});

test('bad targets in a batch fail alone, each with a one-line reason: unknown scheme, too small, unwritable; the rest complete', async () => {
  const small = join(dir, 'small.raw');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', small, '1M']);
  const batch = writeBatch('bad.json', {
    source: local,
    targets: [
      join(dir, 'ok1.raw'),
      'frob://nowhere/x.raw',
      { target: small, noCreate: true },
      join(dir, 'ok2.raw'),
      join(dir, 'no/such/dir/x.raw'),
    ],
    attempts: 1,
  });
  const r = await fleet.cliAsync(['submit', '--batch', batch, '--wait', '--output', 'json']);
  assert.is(r.code, 1);
  assert.match(r.stderr, /^blockconv: 3 of 5 jobs failed: /);
  assert.is(r.stderr.trim().split('\n').length, 1, 'one line');
  const jobs = JSON.parse(r.stdout) as ConvertJobSummary[];
  const by = (t: string): ConvertJobSummary => jobs.find((j) => j.target.endsWith(t))!;
  assert.is(by('ok1.raw').result?.checksum, rawDigest);
  assert.is(by('ok2.raw').result?.checksum, rawDigest);
  assert.match(by('x.raw').failedReason!, /./);
  assert.match(jobs.find((j) => j.target.startsWith('frob:'))!.failedReason!, /frob/);
  assert.match(by('small.raw').failedReason!, /target is smaller than the source \(1048576 < 33554432 bytes\)/);
  assert.match(by('dir/x.raw').failedReason!, /no such file or directory/);
  for (const j of jobs) assert.not.match(j.failedReason ?? '', /\n/);
  // Several targets in one job: the bad one fails alone and the job says so.
  const tee = await fleet.cliAsync([
    'submit',
    '--wait',
    '--output',
    'json',
    '--tee',
    join(dir, 'no/such/dir/y.raw'),
    local,
    join(dir, 'ok3.raw'),
  ]);
  assert.is(tee.code, 1);
  const [j] = JSON.parse(tee.stdout) as ConvertJobSummary[];
  assert.is(j!.state, 'completed');
  assert.equal(
    j!.result!.targets!.map((t) => t.ok),
    [true, false],
  );
  assert.match(tee.stderr, /1 of 1 jobs failed: .*y\.raw.*no such file or directory/);
  execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', local, join(dir, 'ok3.raw')]);
});

test("the dashboard (bull-board) in headless chromium shows a running job's progress and a failed job's reason", async () => {
  const dash = spawn(process.execPath, [BIN, 'dashboard', '--port', '0'], {
    env: fleet.env,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  try {
    const url = await new Promise<string>((resolve, reject) => {
      let err = '';
      dash.stderr!.on('data', (d: Buffer) => {
        err += d.toString();
        const m = /dashboard: (http:\S+)/.exec(err);
        if (m) resolve(m[1]!);
      });
      dash.on('exit', (c) => reject(new Error(`dashboard exited ${c}: ${err}`)));
    });
    assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\/$/, 'bound to loopback by default');
    const failed = (
      JSON.parse(
        fleet.cli(['submit', '--output', 'json', '--attempts', '1', join(dir, 'missing.raw'), join(dir, 'never.raw')])
          .stdout,
      ) as { ids: string[] }
    ).ids[0]!;
    const running = (
      JSON.parse(
        fleet.cli(['submit', '--output', 'json', '-r', String(MiB / 2), local, join(dir, 'slow.raw')]).stdout,
      ) as { ids: string[] }
    ).ids[0]!;
    for (let i = 0; i < 200; i++) {
      const [j] = JSON.parse(fleet.cli(['jobs', '--output', 'json', running]).stdout) as ConvertJobSummary[];
      if ((j?.progress?.done ?? 0) > 0) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const page = (status: string): string => {
      const r = spawnSync(
        'chromium',
        [
          '--headless',
          '--no-sandbox',
          '--disable-gpu',
          '--virtual-time-budget=8000',
          '--dump-dom',
          `${url}queue/blockconv-convert?status=${status}`,
        ],
        { encoding: 'utf8', timeout: 90_000 },
      );
      assert.is(r.status, 0, r.stderr);
      return r.stdout.replace(/<[^>]*>/g, ' ').replace(/\s+/g, ' ');
    };
    const active = page('active');
    assert.match(active, new RegExp(`#${running} convert`), 'the running job is listed');
    assert.match(active, /\b\d{1,2}(\.\d)?% /, 'with its progress');
    assert.match(active, /slow\.raw/);
    const failures = page('failed');
    assert.match(
      failures,
      new RegExp(`#${failed} convert .*missing\\.raw open: no such file or directory`),
      'the failed job with its reason',
    );
  } finally {
    dash.kill('SIGTERM');
  }
});

test('a CHAP password named by reference (password-env) is resolved on the worker and never reaches Redis, the logs or the dashboard data', async () => {
  // Only a worker that has the secret runs this job.
  await fleet.stopAll();
  const password = chapPassword();
  await fleet.startWorker('chap', [], { BLOCKCONV_TEST_CHAP: password });
  const src = join(dir, 'chap-src.raw');
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', src, String(LUNS.chap.size)]);
  execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5c 1M 3M', src], { stdio: 'ignore' });
  const lun = `iscsi://${CHAP_USER}@${PORTAL}/${IQN}:chap/1`;
  const r = fleet.cli([
    'submit',
    '--wait',
    '--output',
    'json',
    '-n',
    '-W',
    '--target-opts',
    'password-env=BLOCKCONV_TEST_CHAP',
    src,
    lun,
  ]);
  assert.is(r.code, 0, r.stderr);
  const [job] = JSON.parse(r.stdout) as ConvertJobSummary[];
  assert.is(job!.result?.checksum, checksumOf(src));
  const refused = fleet.cli(['submit', '--target-opts', `password=${password}`, src, lun]);
  assert.is(refused.code, 1);
  assert.match(refused.stderr, /must not carry a secret; name it by reference/);
  // Everything Redis ever stored is in its append-only files.
  const redisDir = process.env.REDIS_DIR ?? '/var/tmp/blockconv-redis';
  const files = fs
    .readdirSync(redisDir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath ?? (e as unknown as { path: string }).path, e.name));
  assert.ok(
    files.some((f) => f.includes('appendonly')),
    `Redis's append-only files are there (${files.join(', ')})`,
  );
  for (const f of files) assert.not.ok(fs.readFileSync(f).includes(password), `${f} holds no password`);
  for (const [name, log] of fleet.logs) assert.not.ok(log.includes(password), `worker ${name}'s log holds no password`);
  assert.not.ok(fleet.cli(['jobs', '--output', 'json']).stdout.includes(password));
});

test.run();
