/**
 * Fleet workers against a real Redis (tools/redis-server.sh): jobs complete with the
 * source's checksum; a worker closed mid-job leaves a checkpoint in the job, and the
 * retry on another worker resumes from it.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Queue, QueueEvents } from 'bullmq';
import { DriverRegistry, checksumImage } from '@blockconv/core';
import { drivers as raw } from '@blockconv/driver-raw';
import { CONVERT_QUEUE, FleetWorker, submitConvert, type ConvertJobResult } from '../src/index.js';
import { REDIS_URL, ensureServer } from '../../../tools/test/redis-server.js';
import { waitForProgress } from './helpers.js';

ensureServer();
const MiB = 1024 * 1024;
const dir = fs.mkdtempSync(join(process.env.BLOCKCONV_TEST_DIR ?? tmpdir(), 'blockconv-fleet-'));
const registry = new DriverRegistry().register(...raw);
const queue = new Queue(CONVERT_QUEUE, { connection: { url: REDIS_URL, maxRetriesPerRequest: null } });
const events = new QueueEvents(CONVERT_QUEUE, { connection: { url: REDIS_URL, maxRetriesPerRequest: null } });
const source = join(dir, 'template.raw');
let digest = '';

test.before(async () => {
  await queue.obliterate({ force: true });
  await events.waitUntilReady();
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', source, '256M']);
  execFileSync(
    'qemu-io',
    ['-f', 'raw', '-c', 'write -P 0x5a 0 40M', '-c', 'write -P 0x11 100M 60M', '-c', 'write -P 0 200M 8M', source],
    { stdio: 'ignore' },
  );
  execFileSync('dd', [
    'if=/dev/urandom',
    `of=${source}`,
    'bs=1M',
    'seek=230',
    'count=20',
    'conv=notrunc',
    'status=none',
  ]);
  const img = await registry.open(source, { readOnly: true });
  digest = (await checksumImage(img)).checksum;
  await img.close();
});

test.after(async () => {
  await queue.obliterate({ force: true }).catch(() => {});
  await Promise.all([queue.close(), events.close()]);
  fs.rmSync(dir, { recursive: true, force: true });
});

test("two workers complete a batch of 6 targets from one template, each with the template's checksum", async () => {
  const workers = [
    new FleetWorker({ redis: REDIS_URL, registry, name: 'a' }),
    new FleetWorker({ redis: REDIS_URL, registry, name: 'b' }),
  ];
  try {
    const ids = await Promise.all(
      Array.from({ length: 6 }, (_, i) =>
        submitConvert(REDIS_URL, { sources: [source], target: join(dir, `t${i}.raw`) }),
      ),
    );
    const results = await Promise.all(
      ids.map(async (id) => (await (await queue.getJob(id))!.waitUntilFinished(events, 120_000)) as ConvertJobResult),
    );
    for (const r of results) assert.is(r.checksum, digest);
    assert.equal(new Set(results.map((r) => r.worker)), new Set(['a', 'b']), 'both workers took jobs');
  } finally {
    await Promise.all(workers.map((w) => w.close()));
  }
});

test('a worker closed mid-job saves a checkpoint into the job; the retry on another worker resumes from it', async () => {
  const a = new FleetWorker({ redis: REDIS_URL, registry, name: 'a' });
  const target = join(dir, 'resumed.raw');
  const id = await submitConvert(
    REDIS_URL,
    { sources: [source], target, rateLimit: 40 * MiB, checkpointBytes: 16 * MiB },
    { backoff: { type: 'fixed', delay: 200 } },
  );
  const job = (await queue.getJob(id))!;
  // Once it has gone some way, the worker is shut down.
  await waitForProgress(queue, id, 64 * MiB, 10_000);
  await a.close();
  const stopped = (await queue.getJob(id))!;
  assert.ok(stopped.data.resume && stopped.data.resume.progress.done > 0, 'the job holds a checkpoint');
  assert.is(stopped.attemptsMade, 1);
  const b = new FleetWorker({ redis: REDIS_URL, registry, name: 'b' });
  try {
    const r = (await job.waitUntilFinished(events, 120_000)) as ConvertJobResult;
    assert.is(r.worker, 'b');
    assert.ok((r.resumedFrom ?? 0) > 0, `resumed from ${r.resumedFrom}`);
    assert.is(r.checksum, digest);
    execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', source, target]);
  } finally {
    await b.close();
  }
});

test.run();
