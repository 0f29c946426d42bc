/**
 * The fleet through the CLI, with real processes: three `blockconv worker`s on a real
 * Redis, `submit --wait` and `jobs`; a worker SIGTERMed mid-job checkpoints it and
 * another worker resumes it; an unreachable Redis and credentials in a location are one
 * line errors.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Queue } from 'bullmq';
import { CONVERT_QUEUE, type ConvertJobSummary } from '../src/index.js';
import { REDIS_URL, ensureServer } from '../../../tools/test/redis-server.js';
import { BIN, FleetProcesses, waitForProgress } from './helpers.js';

ensureServer();
const dir = fs.mkdtempSync(join(process.env.BLOCKCONV_TEST_DIR ?? tmpdir(), 'blockconv-fleet-cli-'));
const fleet = new FleetProcesses({
  ...process.env,
  BLOCKCONV_REDIS: REDIS_URL,
  BLOCKCONV_STATE_DIR: join(dir, 'state'),
});
const env = fleet.env;
const cli = (args: string[]) => fleet.cli(args);
const jobEnd = (id: string) => fleet.jobEnd(id);
const startWorker = (name: string, ...flags: string[]) => fleet.startWorker(name, flags);
const stopWorker = (w: ChildProcess) => fleet.stopWorker(w);
const workers = fleet.workers;
const source = join(dir, 'template.raw');
let digest = '';

test.before(async () => {
  const q = new Queue(CONVERT_QUEUE, { connection: { url: REDIS_URL, maxRetriesPerRequest: null } });
  await q.obliterate({ force: true });
  await q.close();
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', source, '192M']);
  execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x21 0 30M', '-c', 'write -P 0x42 64M 50M', source], {
    stdio: 'ignore',
  });
  execFileSync('dd', [
    'if=/dev/urandom',
    `of=${source}`,
    'bs=1M',
    'seek=150',
    'count=30',
    'conv=notrunc',
    'status=none',
  ]);
  digest = (JSON.parse(cli(['checksum', '--output', 'json', source]).stdout) as { checksum: string }).checksum;
});

test.after(async () => {
  await Promise.all(workers.map(stopWorker));
  fs.rmSync(dir, { recursive: true, force: true });
});

test("3 workers, 6 targets from one template: all complete with the template's checksum; jobs lists them", async () => {
  await Promise.all(['w1', 'w2', 'w3'].map((n) => startWorker(n)));
  const runs = await Promise.all(
    Array.from(
      { length: 6 },
      (_, i) =>
        new Promise<{ code: number | null; stdout: string }>((resolve) => {
          const c = spawn(
            process.execPath,
            [BIN, 'submit', '--wait', '--output', 'json', source, join(dir, `t${i}.raw`)],
            { env, stdio: ['ignore', 'pipe', 'ignore'] },
          );
          let out = '';
          c.stdout.on('data', (d: Buffer) => {
            out += d.toString();
          });
          c.on('exit', (code) => resolve({ code, stdout: out }));
        }),
    ),
  );
  const jobs = runs.map((r) => {
    assert.is(r.code, 0);
    return (JSON.parse(r.stdout) as ConvertJobSummary[])[0]!;
  });
  for (const j of jobs) {
    assert.is(j.state, 'completed');
    assert.is(j.result?.checksum, digest);
  }
  assert.ok(new Set(jobs.map((j) => j.result!.worker)).size >= 2, 'the jobs were spread over the workers');
  const listed = JSON.parse(cli(['jobs', '--output', 'json']).stdout) as ConvertJobSummary[];
  assert.ok(jobs.every((j) => listed.some((l) => l.id === j.id && l.state === 'completed')));
  const human = cli(['jobs', jobs[0]!.id]);
  assert.match(human.stdout, new RegExp(`^${jobs[0]!.id}\\s+completed .*t\\d\\.raw ${digest}`));
});

test('a worker stopped (SIGTERM) mid-job checkpoints it; another worker resumes it and it completes verified', async () => {
  // One worker at a time, slowed by its rate limit: w4 takes the job, is stopped, w5 resumes it.
  await Promise.all(workers.map(stopWorker));
  const w4 = await startWorker('w4');
  const target = join(dir, 'moved.raw');
  const q = new Queue(CONVERT_QUEUE, { connection: { url: REDIS_URL, maxRetriesPerRequest: null } });
  try {
    const job = await q.add(
      'convert',
      { sources: [source], target, rateLimit: 30 * 1024 * 1024, checkpointBytes: 16 * 1024 * 1024 },
      { attempts: 3, backoff: { type: 'fixed', delay: 200 } },
    );
    await waitForProgress(q, job.id!, 40 * 1024 * 1024);
    await stopWorker(w4);
    const stopped = (await q.getJob(job.id!))!;
    assert.ok((stopped.data.resume?.progress.done ?? 0) > 0, 'a checkpoint is in the job');
    await startWorker('w5');
    const done = await jobEnd(job.id!);
    assert.is(done?.state, 'completed', JSON.stringify(done));
    assert.is(done!.result!.worker, 'w5');
    assert.ok((done!.result!.resumedFrom ?? 0) > 0, `resumed from ${done!.result!.resumedFrom}`);
    assert.is(done!.result!.checksum, digest);
    execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', source, target]);
  } finally {
    await q.close();
  }
});

test('kill -9 of the worker running a job: another takes it over once its lock lapses, resumes from the checkpoint, and it completes verified', async () => {
  await Promise.all(workers.map(stopWorker));
  const w6 = await startWorker('w6', '--lock-seconds', '2');
  const target = join(dir, 'orphaned.raw');
  const q = new Queue(CONVERT_QUEUE, { connection: { url: REDIS_URL, maxRetriesPerRequest: null } });
  try {
    const job = await q.add(
      'convert',
      { sources: [source], target, rateLimit: 30 * 1024 * 1024, checkpointBytes: 16 * 1024 * 1024 },
      { attempts: 3 },
    );
    await waitForProgress(q, job.id!, 40 * 1024 * 1024);
    const killed = new Promise((r) => w6.on('exit', r));
    w6.kill('SIGKILL');
    await killed;
    const atKill = (await q.getJob(job.id!))!;
    const checkpoint = atKill.data.resume?.progress.done ?? 0;
    // Copied again: what the dead worker had written past its checkpoint. Its last progress
    // report (once a second) says at least how much; the checkpoint's dirtyEnd bounds it.
    const dirtyEnd = atKill.data.resume?.progress.dirtyEnd ?? 0;
    const reported = Math.max(0, ((atKill.progress as { done?: number }).done ?? 0) - checkpoint);
    if (process.env.BLOCKCONV_FLEET_REPORT)
      console.log(
        `  kill -9: checkpoint at ${checkpoint} bytes; copied again: at least ${reported} (last progress), at most ${dirtyEnd - checkpoint} (dirtyEnd)`,
      );
    assert.ok(
      dirtyEnd - checkpoint <= 16 * 1024 * 1024 + 8 * 2 * 1024 * 1024,
      `at most one interval and the buffers in flight are copied again (${dirtyEnd - checkpoint})`,
    );
    assert.ok(checkpoint > 0, 'the dead worker left a checkpoint in the job');
    await startWorker('w7', '--lock-seconds', '2');
    const done = await jobEnd(job.id!);
    assert.is(done?.state, 'completed', JSON.stringify(done));
    assert.is(done!.result!.worker, 'w7');
    assert.is(done!.result!.resumedFrom, checkpoint, 'resumed from the checkpoint the dead worker saved');
    assert.is(done!.result!.checksum, digest);
    execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', source, target]);
  } finally {
    await q.close();
  }
});

test('bad input: unreachable Redis, credentials in a location, a missing source: one line each, non-zero', async () => {
  const down = spawnSync(process.execPath, [BIN, 'jobs', '--redis', 'redis://127.0.0.1:1'], {
    encoding: 'utf8',
    env,
    timeout: 30_000,
  });
  assert.is(down.status, 1);
  assert.match(down.stderr, /^blockconv: .*cannot reach Redis at redis:\/\/127\.0\.0\.1:1: connect ECONNREFUSED/);
  assert.is(down.stderr.trim().split('\n').length, 1);
  const secret = cli(['submit', 'iscsi://user%hunter2secret@127.0.0.1/iqn.2026-11.x:y/1', join(dir, 'x.raw')]);
  assert.is(secret.code, 1);
  assert.match(secret.stderr, /must not carry credentials/);
  assert.not.match(secret.stderr + secret.stdout, /hunter2secret/);
  const missing = cli(['submit', '--wait', '--attempts', '1', join(dir, 'nope.raw'), join(dir, 'y.raw')]);
  assert.is(missing.code, 1);
  assert.match(missing.stderr, /failed: .*nope\.raw.*(no such file|ENOENT)/i);
});

test.run();
