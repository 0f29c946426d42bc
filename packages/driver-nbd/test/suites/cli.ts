// The CLI with nbd:// sources and targets, checked with Debian's tools: qemu-img compare
// as the oracle, nbdinfo --map against blockconv map.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { MiB, cli, compare, nbdkit, qemuNbd, run, sparseImage, tmpDir } from '../helpers.js';

const test = suite('nbd cli');
let dir: string;
test.before.each(() => {
  dir = tmpDir();
});
test.after.each(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

test('file → nbd (qemu-nbd over a raw file, -n): identical, and without -n a clear refusal', async () => {
  const src = path.join(dir, 'src.raw');
  sparseImage(src, 64 * MiB, [
    [0, 3],
    [20, 1],
    [50, 7],
  ]);
  const dst = path.join(dir, 'dst.raw');
  sparseImage(dst, 64 * MiB, [[0, 64]]); // old data everywhere: zeroes must be written
  const server = await qemuNbd(dir, dst, 'raw');
  try {
    const r = cli(['convert', '-n', '-m', '4', '-W', src, server.url]);
    assert.is(r.status, 0, r.stderr);
    const refused = cli(['convert', src, server.url]);
    assert.is(refused.status, 1);
    assert.match(refused.stderr, /nbd cannot create images; use an existing one with -n/);
    assert.is(refused.stderr.trim().split('\n').length, 1, 'one line');
  } finally {
    await server.stop();
  }
  assert.is(compare(src, dst).status, 0, 'qemu-img compare: identical');
});

test('nbd (qemu-nbd over qcow2, read-only) → raw file: identical, holes stay holes', async () => {
  const src = path.join(dir, 'src.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', src, '64M']);
  run('qemu-io', [
    '-f',
    'qcow2',
    '-c',
    'write -P 0x11 1M 2M',
    '-c',
    'write -P 0x22 40M 64K',
    '-c',
    'write -z 50M 1M',
    src,
  ]);
  const server = await qemuNbd(dir, src, 'qcow2', ['-r']);
  const dst = path.join(dir, 'out.raw');
  try {
    const r = cli(['convert', '-O', 'raw', server.url, dst, '--output', 'json']);
    assert.is(r.status, 0, r.stderr);
    const done = JSON.parse(r.stdout.trim().split('\n').pop()!) as { bytesRead: number };
    assert.ok(done.bytesRead <= 3 * MiB, `only the data is read: ${done.bytesRead}`);
  } finally {
    await server.stop();
  }
  assert.is(compare(src, dst, ['qcow2', 'raw']).status, 0);
  assert.ok(fs.statSync(dst).blocks * 512 <= 4 * MiB, 'the target stays sparse');
});

test('nbd → nbd: nbdkit sparse-random into an nbdkit memory disk, compared by qemu-img over NBD', async () => {
  const src = await nbdkit(dir, ['sparse-random', '128M', 'seed=7', 'percent=30', 'runlength=524288']);
  const dst = await nbdkit(dir, ['memory', '128M']);
  try {
    const r = cli(['convert', '-n', '-m', '8', '-W', src.url, dst.url]);
    assert.is(r.status, 0, r.stderr);
    const c = compare(src.url, dst.url);
    assert.is(c.status, 0, c.out);
  } finally {
    await src.stop();
    await dst.stop();
  }
});

test('an export with old data and fast zero is zeroed in one request first, then only data is written; without fast zero, zeroes are written', async () => {
  const src = path.join(dir, 'src.raw');
  sparseImage(src, 64 * MiB, [
    [10, 3],
    [40, 1],
  ]);
  for (const [filters, fast] of [
    [[], true],
    [['--filter=nozero', 'zeromode=plugin', 'fastzeromode=none'], false],
  ] as const) {
    const log = path.join(dir, `log-${fast}`);
    const dst = await nbdkit(dir, [
      '--filter=log',
      ...filters.filter((f) => f.startsWith('--')),
      'memory',
      '64M',
      `logfile=${log}`,
      ...filters.filter((f) => !f.startsWith('--')),
    ]);
    try {
      run('qemu-io', ['-f', 'raw', '-c', 'write -P 7 30M 2M', dst.url]); // old data where the source has a hole
      const r = cli(['convert', '-n', '--output', 'json', src, dst.url]);
      assert.is(r.status, 0, r.stderr);
      const done = JSON.parse(r.stdout.trim().split('\n').pop()!) as { preZeroed?: boolean; bytesZeroed: number };
      assert.is(done.preZeroed === true, fast, `preZeroed with fast zero: ${fast}`);
      assert.is(compare(src, dst.url).status, 0, 'identical: the old data is gone');
      const zeroes = fs
        .readFileSync(log, 'utf8')
        .split('\n')
        .filter((l) => / Zero id=\d+ /.test(l));
      if (fast) {
        assert.is(zeroes.length, 1, zeroes.join('\n'));
        assert.match(zeroes[0]!, /offset=0x0 count=0x4000000 .*fast=1/);
        assert.is(done.bytesZeroed, 0);
      } else {
        assert.ok(
          zeroes.every((l) => /fast=0/.test(l)),
          'no fast zero asked of a server without it',
        );
        assert.ok(done.bytesZeroed > 0, 'zero extents written');
      }
    } finally {
      await dst.stop();
    }
  }
});

test('blockconv map of an export agrees with nbdinfo --map', async () => {
  const src = await nbdkit(dir, ['sparse-random', '64M', 'seed=11', 'percent=40', 'runlength=262144']);
  try {
    const r = cli(['map', '--output', 'json', src.url]);
    assert.is(r.status, 0, r.stderr);
    const ours = merge(
      (JSON.parse(r.stdout) as { start: number; length: number; zero: boolean }[]).map((e) => [
        e.start,
        e.length,
        e.zero,
      ]),
    );
    const theirs = merge(
      (
        JSON.parse(run('nbdinfo', ['--map', '--json', src.url])) as { offset: number; length: number; type: number }[]
      ).map((e) => [e.offset, e.length, (e.type & 2) !== 0]),
    );
    assert.ok(theirs.length > 10, `${theirs.length} extents to compare`);
    assert.equal(ours, theirs);
  } finally {
    await src.stop();
  }
});

/** Adjacent extents of the same kind as one. */
function merge(list: [number, number, boolean][]): [number, number, boolean][] {
  const out: [number, number, boolean][] = [];
  for (const [start, length, zero] of list) {
    const last = out[out.length - 1];
    if (last && last[2] === zero && last[0] + last[1] === start) last[1] += length;
    else out.push([start, length, zero]);
  }
  return out;
}

test('the source server killed mid-convert: one line naming the offset, exit 1, target not reported complete', async () => {
  const src = await nbdkit(dir, ['--filter=delay', 'pattern', '256M', 'delay-read=200ms']);
  const dst = path.join(dir, 'out.raw');
  const child = await import('node:child_process');
  const { CLI } = await import('../helpers.js');
  const p = child.spawn(process.execPath, [CLI, 'convert', '-m', '4', '--output', 'json', src.url, dst], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  p.stdout.on('data', (d: Buffer) => {
    out += d.toString();
  });
  p.stderr.on('data', (d: Buffer) => {
    err += d.toString();
  });
  await new Promise((r) => setTimeout(r, 1500));
  const killedAt = Date.now();
  src.kill();
  const status = await new Promise<number | null>((r) => p.once('exit', (code) => r(code)));
  assert.ok(Date.now() - killedAt < 10_000, 'exits in bounded time');
  assert.is(status, 1, err);
  assert.match(err, /read at offset \d+ \(\+\d+\): the NBD server closed the connection/);
  assert.not.match(out, /"event":\s*"done"/);
});

test('drivers lists nbd and its package; info shows the export', async () => {
  const d = cli(['drivers']);
  assert.match(d.stdout, /protocol nbd\s+schemes: nbd, nbd\+unix/);
  const src = await nbdkit(dir, ['memory', '16M']);
  try {
    const r = cli(['info', '--output', 'json', src.url]);
    assert.is(r.status, 0, r.stderr);
    assert.is((JSON.parse(r.stdout) as { 'virtual-size': number })['virtual-size'], 16 * MiB);
  } finally {
    await src.stop();
  }
});

test.run();
