/**
 * End-to-end tests of the blockconv command on real sparse files, with Debian's
 * qemu-img as the oracle (qemu-img compare / map / info).
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import * as assert from 'uvu/assert';

const BIN = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'blockconv.js');
const MiB = 1024 * 1024;
const dir = mkdtempSync(join(process.env.BLOCKCONV_TEST_DIR ?? tmpdir(), 'blockconv-cli-'));
const p = (name: string): string => join(dir, name);

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function run(...args: string[]): Run {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8' });
}

function qemuCompare(a: string, b: string, ...flags: string[]): { code: number; out: string } {
  const r = spawnSync('qemu-img', ['compare', ...flags, a, b], { encoding: 'utf8' });
  return { code: r.status ?? -1, out: r.stdout + r.stderr };
}

/** A sparse raw image with random data, written-zero ranges and holes. */
function makeSparse(
  name: string,
  size: number,
  writes: Array<[number, number]>,
  zeroWrites: Array<[number, number]> = [],
): string {
  const file = p(name);
  rmSync(file, { force: true });
  execFileSync('truncate', ['-s', String(size), file]);
  for (const [off, len] of writes) {
    execFileSync('dd', [
      'if=/dev/urandom',
      `of=${file}`,
      'bs=64K',
      `seek=${off / 65536}`,
      `count=${len / 65536}`,
      'conv=notrunc',
      'status=none',
    ]);
  }
  const cmds = zeroWrites.flatMap(([off, len]) => ['-c', `write -P 0 ${off} ${len}`]);
  if (cmds.length) execFileSync('qemu-io', ['-f', 'raw', ...cmds, file], { stdio: 'ignore' });
  return file;
}

/** Map entries reduced to what a raw file's map means: data or zero ranges, merged. */
function simplify(
  entries: Array<{ start: number; length: number; data: boolean; zero: boolean }>,
): Array<[number, number, boolean]> {
  const out: Array<[number, number, boolean]> = [];
  for (const e of entries) {
    const last = out.at(-1);
    if (last && last[2] === e.data) last[1] += e.length;
    else out.push([e.start, e.length, e.data]);
  }
  return out;
}

const src = makeSparse(
  'src.raw',
  64 * MiB,
  [
    [0, 64 * 1024],
    [MiB, 5 * MiB],
    [10 * MiB, 128 * 1024],
    [20 * MiB + 192 * 1024, 64 * 1024],
    [63 * MiB, MiB],
  ],
  [[30 * MiB, 2 * MiB]],
);

test.after(() => rmSync(dir, { recursive: true, force: true }));

test('convert raw -> raw: qemu-img compare agrees, holes and zero data stay sparse', () => {
  const r = run('convert', src, p('out.raw'));
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stderr, '');
  const c = qemuCompare(src, p('out.raw'));
  assert.is(c.code, 0, c.out);
  assert.ok(statSync(p('out.raw')).blocks * 512 <= statSync(src).blocks * 512, 'no more allocated than the source');
  const map = JSON.parse(qemuImg('map', '--output=json', '-f', 'raw', p('out.raw'))) as Array<{
    start: number;
    length: number;
    data: boolean;
    zero: boolean;
  }>;
  const zeroAt30M = map.find((e) => e.start <= 30 * MiB && e.start + e.length > 30 * MiB)!;
  assert.ok(!zeroAt30M.data, 'written zeroes in the source are a hole in the target');
});

test('blockconv map agrees with qemu-img map on sparse files', () => {
  for (const f of [src, p('out.raw')]) {
    const ours = run('map', '--output=json', '-f', 'raw', f);
    assert.is(ours.code, 0, ours.stderr);
    const theirs = qemuImg('map', '--output=json', '-f', 'raw', f);
    assert.equal(simplify(JSON.parse(ours.stdout)), simplify(JSON.parse(theirs)));
    assert.equal(JSON.parse(ours.stdout), JSON.parse(theirs), 'the same entries, field for field');
  }
});

test('options: -m 1, -m 16 -W, --buffer-size 64k, -S 0 (fully allocated)', () => {
  for (const args of [
    ['-m', '1'],
    ['-m', '16', '-W'],
    ['--buffer-size', '64k'],
  ]) {
    rmSync(p('o.raw'), { force: true });
    const r = run('convert', ...args, src, p('o.raw'));
    assert.is(r.code, 0, r.stderr);
    assert.is(qemuCompare(src, p('o.raw')).code, 0, args.join(' '));
  }
  const r = run('convert', '-S', '0', src, p('full.raw'));
  assert.is(r.code, 0, r.stderr);
  assert.is(qemuCompare(src, p('full.raw')).code, 0);
  const map = JSON.parse(qemuImg('map', '--output=json', '-f', 'raw', p('full.raw'))) as Array<{ data: boolean }>;
  assert.ok(
    map.every((e) => e.data),
    '-S 0 allocates everything',
  );
});

test('-n writes into an existing larger image and zeroes its old content', () => {
  const old = makeSparse('old.raw', 80 * MiB, [[0, 80 * MiB]]);
  const r = run('convert', '-n', src, old);
  assert.is(r.code, 0, r.stderr);
  assert.is(statSync(old).size, 80 * MiB, 'not truncated');
  // The first 64 MiB equal the source; compare through a slice made by dd.
  execFileSync('truncate', ['-s', String(64 * MiB), old]);
  assert.is(qemuCompare(src, old).code, 0);
});

test('-n --target-is-zero skips zeroes', () => {
  execFileSync('truncate', ['-s', String(64 * MiB), p('zero.raw')]);
  const r = run('convert', '-n', '--target-is-zero', '--output', 'json', src, p('zero.raw'));
  assert.is(r.code, 0, r.stderr);
  const res = JSON.parse(r.stdout.trim().split('\n').at(-1)!);
  assert.is(res.bytesZeroed, 0);
  assert.ok(res.bytesSkipped > 50 * MiB);
  assert.is(qemuCompare(src, p('zero.raw')).code, 0);
});

test('a smaller existing target with -n is an error naming both sizes', () => {
  execFileSync('truncate', ['-s', String(MiB), p('small.raw')]);
  const r = run('convert', '-n', src, p('small.raw'));
  assert.is(r.code, 1);
  assert.match(r.stderr, /target is smaller than the source \(1048576 < 67108864 bytes\)/);
  assert.is(r.stderr.trim().split('\n').length, 1, 'one line');
});

test('without -n an existing larger target is replaced at the source size', () => {
  makeSparse('big.raw', 100 * MiB, [[0, MiB]]);
  const r = run('convert', src, p('big.raw'));
  assert.is(r.code, 0, r.stderr);
  assert.is(statSync(p('big.raw')).size, 64 * MiB);
  assert.is(qemuCompare(src, p('big.raw')).code, 0);
});

test('several sources are concatenated', () => {
  const a = makeSparse('a.raw', 3 * MiB, [[0, MiB]]);
  const b = makeSparse('b.raw', 2 * MiB, [[MiB, MiB]]);
  const r = run('convert', a, b, p('ab.raw'));
  assert.is(r.code, 0, r.stderr);
  writeFileSync(p('ab.ref'), Buffer.concat([readFileSync(a), readFileSync(b)]));
  assert.is(qemuCompare(p('ab.ref'), p('ab.raw'), '-f', 'raw', '-F', 'raw').code, 0);
});

test('-t none / -T none (O_DIRECT) on a disk file system', () => {
  const d = mkdtempSync('/var/tmp/blockconv-direct-');
  try {
    const s = join(d, 's.raw');
    execFileSync('cp', ['--sparse=always', src, s]);
    const r = run('convert', '-t', 'none', '-T', 'none', s, join(d, 'o.raw'));
    assert.is(r.code, 0, r.stderr);
    assert.is(qemuCompare(s, join(d, 'o.raw')).code, 0);
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('compare: exit 0 identical, 1 with the first differing offset as qemu-img finds it, 2 on error', () => {
  const same = run('compare', src, p('out.raw'));
  assert.is(same.code, 0);
  assert.is(same.stdout, 'Images are identical.\n');
  execFileSync('cp', ['--sparse=always', src, p('diff.raw')]);
  execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 7 12345678 1000', p('diff.raw')], { stdio: 'ignore' });
  const diff = run('compare', src, p('diff.raw'));
  assert.is(diff.code, 1);
  const ours = Number(/offset (\d+)/.exec(diff.stdout)![1]);
  const theirs = Number(/offset (\d+)/.exec(qemuCompare(src, p('diff.raw')).out)![1]);
  assert.is(Math.floor(ours / 512) * 512, theirs, 'same sector as qemu-img');
  const missing = run('compare', src, p('nope.raw'));
  assert.is(missing.code, 2);
  assert.match(missing.stderr, /nope\.raw.*no such file or directory/);
});

test('info matches qemu-img info (human and JSON)', () => {
  const ours = JSON.parse(run('info', '--output=json', p('out.raw')).stdout);
  const theirs = JSON.parse(qemuImg('info', '--output=json', p('out.raw')));
  assert.is(ours['virtual-size'], theirs['virtual-size']);
  assert.is(ours.format, theirs.format);
  assert.is(ours['actual-size'], theirs['actual-size']);
  const chain = JSON.parse(run('info', '--backing-chain', '--output=json', p('out.raw')).stdout);
  assert.is(chain.length, 1, 'a raw image is a chain of one');
  assert.is(chain[0]['virtual-size'], theirs['virtual-size']);
  const human = run('info', p('out.raw'));
  assert.match(human.stdout, /virtual size: 64 MiB \(67108864 bytes\)/);
});

test('progress: --progress=json prints JSON lines ending at 100%; -p without a terminal prints percentages', () => {
  const r = run('convert', '--progress=json', src, p('pj.raw'));
  assert.is(r.code, 0, r.stderr);
  const lines = r.stdout
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l));
  assert.ok(lines.length >= 1);
  assert.is(lines.at(-1).done, 64 * MiB);
  assert.is(lines.at(-1).percent, 100);
  const bar = run('convert', '-p', src, p('pb.raw'));
  assert.match(bar.stderr, /\(100\.00\/100%\)/);
  assert.match(bar.stderr, /converted 64 MiB/);
});

test('bad input: one line, non-zero exit, the cause named', () => {
  const cases: Array<[string[], RegExp]> = [
    [['convert', p('missing.raw'), p('x.raw')], /missing\.raw.*no such file or directory/],
    [['convert', '-f', 'vmdk9', src, p('x.raw')], /unknown format "vmdk9" \(known: [a-z0-9, ]*raw/],
    [['convert', src, 'foo://host/x.raw'], /no driver for scheme "foo": install a package that provides it/],
    [['convert', '-m', 'abc', src, p('x.raw')], /workers must be an integer from 1 to 256/],
    [['convert', '-m', '0', src, p('x.raw')], /workers must be an integer from 1 to 256/],
    [['convert', '-S', '4q', src, p('x.raw')], /invalid sparse size "4q"/],
    [['convert', '-S', '1000', src, p('x.raw')], /multiple of 512/],
    [
      ['convert', '-t', 'fast', src, p('x.raw')],
      /Allowed choices are none, writeback, writethrough, directsync, unsafe/,
    ],
    [['convert', '--target-is-zero', src, p('x.raw')], /--target-is-zero requires -n/],
    [['convert', src], /convert needs a source and a target/],
    [['convert', dir, p('x.raw')], /is a directory|EISDIR/i],
    [['info', p('missing.raw')], /no such file or directory/],
    [['frobnicate'], /unknown command 'frobnicate'/],
  ];
  for (const [args, re] of cases) {
    const r = run(...args);
    assert.ok(r.code !== 0, `${args.join(' ')}: non-zero exit`);
    assert.match(r.stderr, re, `${args.join(' ')}: ${r.stderr}`);
    assert.not.match(r.stderr, /\n\s+at /, `${args.join(' ')}: no stack trace`);
  }
});

test('a full file system: ENOSPC is a clear error with the offset, never reported as done', () => {
  const mnt = p('tiny');
  mkdirSync(mnt);
  const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', mnt]);
  if (m.status !== 0) {
    console.warn('  (skipped ENOSPC: cannot mount a tmpfs here)');
    return;
  }
  try {
    const r = run('convert', '-p', src, join(mnt, 'out.raw'));
    assert.is(r.code, 1);
    assert.match(r.stderr, /blockconv: .*out\.raw write at offset \d+ .*no space left on device/);
    assert.not.match(r.stderr, /converted/);
  } finally {
    spawnSync('umount', [mnt]);
  }
});

test('--tee: one read, every target written; a full one fails alone and the exit says so', () => {
  const ok = run(
    'convert',
    '--checksum',
    '--output',
    'json',
    '-O',
    'qcow2',
    src,
    p('tee1.qcow2'),
    '--tee',
    p('tee2.qcow2'),
  );
  assert.is(ok.code, 0, ok.stderr);
  const r = JSON.parse(ok.stdout.trim().split('\n').at(-1)!) as {
    bytesRead: number;
    checksum: string;
    targets: Array<{ ok: boolean }>;
  };
  assert.equal(
    r.targets.map((t) => t.ok),
    [true, true],
  );
  for (const t of ['tee1.qcow2', 'tee2.qcow2']) {
    assert.is(qemuCompare(src, p(t)).code, 0, t);
    assert.is(spawnSync('qemu-img', ['check', p(t)]).status, 0);
  }
  const single = JSON.parse(
    run('convert', '--output', 'json', src, p('tee-one.raw')).stdout.trim().split('\n').at(-1)!,
  ) as { bytesRead: number };
  assert.is(r.bytesRead, single.bytesRead, 'the source is read once for two targets');
  assert.is(run('convert', src, p('x.raw'), '--tee', p('x.raw')).code, 1, 'a target named twice');
  const mnt = p('tiny-tee');
  mkdirSync(mnt);
  if (spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', mnt]).status !== 0) {
    console.warn('  (skipped the full target: cannot mount a tmpfs here)');
    return;
  }
  try {
    const bad = run('convert', src, p('tee3.raw'), '--tee', join(mnt, 'full.raw'), '--tee', p('tee4.raw'));
    assert.is(bad.code, 1);
    assert.match(
      bad.stderr,
      /target .*full\.raw failed, the others went on: .*write at offset \d+.*no space left on device/,
    );
    assert.match(bad.stderr, /1 of 3 targets failed .*the others are complete/);
    assert.not.match(bad.stderr, /\n\s+at /);
    for (const t of ['tee3.raw', 'tee4.raw']) assert.is(qemuCompare(src, p(t)).code, 0, t);
  } finally {
    spawnSync('umount', [mnt]);
  }
});

test('SIGINT stops a convert cleanly: exit 130, the target named incomplete', async () => {
  const child = spawn(process.execPath, [BIN, 'convert', '-r', '4M', '--progress=json', src, p('int.raw')], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => {
    stderr += d;
  });
  // Interrupt once the copy is under way (the first progress line), however slow start-up is.
  await new Promise<void>((r) => child.stdout.once('data', () => r()));
  child.kill('SIGINT');
  const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  assert.is(code, 130);
  assert.match(stderr, /convert cancelled \(interrupted by SIGINT\): target .*int\.raw is incomplete/);
});

test('-C: the kernel copies the data (same file system), the result says how much; clashing flags refused in one line', () => {
  const d = mkdtempSync('/var/tmp/blockconv-offload-');
  try {
    const s = join(d, 's.raw');
    execFileSync('cp', ['--sparse=always', src, s]);
    const r = run('convert', '-C', '--output', 'json', s, join(d, 'o.raw'));
    assert.is(r.code, 0, r.stderr);
    const res = JSON.parse(r.stdout.trim().split('\n').at(-1)!);
    assert.ok(res.bytesOffloaded > 0 && res.bytesOffloaded === res.bytesWritten, JSON.stringify(res));
    assert.is(qemuCompare(s, join(d, 'o.raw')).code, 0);
    const human = run('convert', '-C', '-p', s, join(d, 'o2.raw'));
    assert.is(human.code, 0, human.stderr);
    assert.match(human.stderr, /the storage copied [\d.]+ MiB itself \(-C\)/);
    for (const [flag, why] of [
      [['-S', '8k'], /-S/],
      [['-c', '-O', 'qcow2'], /-c/],
      [['--checksum'], /checksum/],
    ] as const) {
      const bad = run('convert', '-C', ...flag, s, join(d, 'bad.img'));
      assert.is(bad.code, 1, flag.join(' '));
      assert.match(bad.stderr, /copy offload \(-C\) cannot/);
      assert.match(bad.stderr, why);
      assert.is(bad.stderr.trim().split('\n').length, 1, 'one line');
      assert.not.ok(existsSync(join(d, 'bad.img')), 'refused before the target was created');
    }
  } finally {
    rmSync(d, { recursive: true, force: true });
  }
});

test('help tells the truth: every convert flag documented', () => {
  const r = run('convert', '--help');
  assert.is(r.code, 0);
  for (const f of [
    '-f,',
    '-O,',
    '-m,',
    '-W,',
    '-S,',
    '-n,',
    '-p',
    '--progress',
    '-q,',
    '-t,',
    '-T,',
    '-o,',
    '-r,',
    '--target-is-zero',
    '-C,',
  ]) {
    assert.ok(r.stdout.includes(f), `help mentions ${f}`);
  }
});

test.run();
