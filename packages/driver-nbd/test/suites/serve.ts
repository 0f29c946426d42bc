// `blockconv serve` with Debian's NBD clients (nbdcopy, qemu-img, qemu-io, nbdinfo) and
// with this package's own client (the conformance kit through the server).
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { conformance } from '@blockconv/core/testkit';
import { openNbd } from '../../src/index.js';
import { CLI, MiB, cli, compare, run, sparseImage, tmpDir } from '../helpers.js';

interface Served {
  readonly url: string;
  readonly child: ChildProcess;
  stderr(): string;
  /** SIGTERM, then the exit code. */
  stop(): Promise<number | null>;
}

/** Starts `blockconv serve --output json ARGS` and waits for its "listening" line. */
async function serve(args: string[]): Promise<Served> {
  const child = spawn(process.execPath, [CLI, 'serve', '--output', 'json', ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
  });
  const url = await new Promise<string>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`serve did not start: ${err}`)), 15_000);
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const line = out.split('\n').find((l) => l.includes('"listening"'));
      if (line) {
        clearTimeout(t);
        resolve((JSON.parse(line) as { url: string }).url);
      }
    });
    child.once('exit', (code) => {
      clearTimeout(t);
      reject(new Error(`serve exited (${code}): ${err}`));
    });
  });
  return {
    url,
    child,
    stderr: () => err,
    stop: async () => {
      if (child.exitCode !== null) return child.exitCode;
      const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
      child.kill('SIGTERM');
      return exited;
    },
  };
}

function sock(dir: string): string {
  return path.join(dir, 'serve.sock');
}

for (const format of ['raw', 'qcow2'] as const) {
  conformance(`nbd client ↔ blockconv serve (${format})`, {
    open: async () => {
      const dir = tmpDir();
      const file = path.join(dir, `disk.${format}`);
      run('qemu-img', ['create', '-q', '-f', format, file, '16M']);
      run('qemu-io', ['-f', format, '-c', 'write -P 0x5a 3M 1M', file]);
      const s = await serve(['--socket', sock(dir), file]);
      return {
        backend: await openNbd(s.url),
        reopen: () => openNbd(s.url),
        openReadOnly: () => openNbd(s.url, { readOnly: true }),
        cleanup: async () => {
          await s.stop();
          fs.rmSync(dir, { recursive: true, force: true });
        },
      };
    },
  });
}

const test = suite('blockconv serve');
let dir: string;
test.before.each(() => {
  dir = tmpDir();
});
test.after.each(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

test('nbdcopy and qemu-img read a served qcow2 exactly; nbdinfo --map agrees with blockconv map of the file', async () => {
  const img = path.join(dir, 'src.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
  run('qemu-io', [
    '-f',
    'qcow2',
    '-c',
    'write -P 0x11 1M 3M',
    '-c',
    'write -P 0x22 30M 64K',
    '-c',
    'write -z 40M 2M',
    img,
  ]);
  const s = await serve(['-r', '--socket', sock(dir), img]);
  try {
    const a = path.join(dir, 'a.raw');
    run('nbdcopy', [s.url, a]);
    assert.is(compare(img, a, ['qcow2', 'raw']).status, 0, 'nbdcopy copy identical');
    const b = path.join(dir, 'b.raw');
    run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', s.url, b]);
    assert.is(compare(img, b, ['qcow2', 'raw']).status, 0, 'qemu-img copy identical');
    assert.ok(fs.statSync(b).blocks * 512 <= 4 * MiB, 'block status let qemu-img skip the holes');
    const theirs = (
      JSON.parse(run('nbdinfo', ['--map', '--json', s.url])) as { offset: number; length: number; type: number }[]
    )
      .filter((e) => (e.type & 2) === 0)
      .map((e) => [e.offset, e.length]);
    const ours = (
      JSON.parse(cli(['map', '--output', 'json', img]).stdout) as { start: number; length: number; data: boolean }[]
    )
      .filter((e) => e.data)
      .map((e) => [e.start, e.length]);
    assert.equal(theirs, ours);
  } finally {
    assert.is(await s.stop(), 0);
  }
});

test('nbdcopy and qemu-io write into a served qcow2: qemu-img check clean, content as written', async () => {
  const img = path.join(dir, 'dst.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
  const src = path.join(dir, 'src.raw');
  sparseImage(src, 64 * MiB, [
    [2, 3],
    [33, 1],
  ]);
  const s = await serve(['--socket', sock(dir), img]);
  try {
    run('nbdcopy', [src, s.url]);
    run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x77 60M 64k',
      '-c',
      'write -z 2M 4k',
      '-c',
      'discard 33M 64k',
      '-c',
      'flush',
      s.url,
    ]);
  } finally {
    assert.is(await s.stop(), 0, s.stderr());
  }
  run('qemu-img', ['check', '-q', img]);
  run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 60M 64k', '-c', 'write -z 2M 4k', '-c', 'write -z 33M 64k', src]);
  assert.is(compare(src, img, ['raw', 'qcow2']).status, 0, 'the image holds what the clients wrote');
});

test('a served raw file zeroes fast: a convert into it with old data is pre-zeroed, then only data is sent', async () => {
  const img = path.join(dir, 'old.raw');
  fs.writeFileSync(img, Buffer.alloc(16 * MiB, 0x5a));
  const src = path.join(dir, 'fz-src.raw');
  sparseImage(src, 16 * MiB, [
    [1, 2],
    [9, 1],
  ]);
  const s = await serve(['--socket', sock(dir), img]);
  let done: { preZeroed?: boolean; bytesZeroed: number };
  try {
    const r = cli(['convert', '-n', '--output', 'json', '-f', 'raw', '-O', 'raw', src, s.url]);
    assert.is(r.status, 0, r.stderr);
    done = JSON.parse(r.stdout) as typeof done;
  } finally {
    assert.is(await s.stop(), 0, s.stderr());
  }
  assert.is(done.preZeroed, true, 'the file export took the fast zero');
  assert.is(done.bytesZeroed, 0);
  assert.is(compare(src, img, ['raw', 'raw']).status, 0);
});

test('a read-only export: nbdinfo says so, writes fail, the image is untouched', async () => {
  const img = path.join(dir, 'disk.raw');
  sparseImage(img, 16 * MiB, [[0, 1]]);
  const before = fs.readFileSync(img);
  const s = await serve(['-r', '--socket', sock(dir), img]);
  try {
    assert.match(run('nbdinfo', [s.url]), /is_read_only: true/);
    const w = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', s.url], { encoding: 'utf8' });
    assert.is.not(w.status, 0);
    assert.match(w.stdout + w.stderr, /Permission denied|write failed|Operation not permitted/i);
  } finally {
    await s.stop();
  }
  assert.ok(fs.readFileSync(img).equals(before));
});

test('many clients at once (multi-conn): four connections write, one reads it all back', async () => {
  const img = path.join(dir, 'disk.raw');
  sparseImage(img, 64 * MiB, []);
  const s = await serve(['--socket', sock(dir), img]);
  try {
    const b = await openNbd(s.url, { options: { connections: '4' } });
    assert.is(b.stats.connections, 4);
    await Promise.all(Array.from({ length: 32 }, (_, i) => b.write(i * 2 * MiB, Buffer.alloc(2 * MiB, i + 1))));
    await b.flush();
    await b.close();
    const r = await openNbd(s.url, { readOnly: true });
    for (let i = 0; i < 32; i++) {
      const got = Buffer.from(await r.read(i * 2 * MiB, 2 * MiB));
      assert.ok(
        got.every((x) => x === i + 1),
        `chunk ${i}`,
      );
    }
    await r.close();
  } finally {
    await s.stop();
  }
});

test('TCP on loopback by default; a non-loopback --bind needs --allow-remote-without-tls; bad flags are one line', async () => {
  const port = await new Promise<number>((resolve) => {
    const t = net.createServer().listen(0, '127.0.0.1', () => {
      const p = (t.address() as net.AddressInfo).port;
      t.close(() => resolve(p));
    });
  });
  const img = path.join(dir, 'disk.raw');
  sparseImage(img, 16 * MiB, [[0, 1]]);
  const s = await serve(['-p', String(port), '-x', 'vm', img]);
  try {
    assert.is(s.url, `nbd://127.0.0.1:${port}/vm`);
    assert.match(run('nbdinfo', ['--size', s.url]), /^16777216/);
    const busy = cli(['serve', '-p', String(port), img]);
    assert.is(busy.status, 1);
    assert.match(busy.stderr, /127\.0\.0\.1:\d+ is already in use/);
    const wrong = spawnSync('nbdinfo', [`nbd://127.0.0.1:${port}/other`], { encoding: 'utf8' });
    assert.is.not(wrong.status, 0, 'an unknown export name is refused');
  } finally {
    await s.stop();
  }
  const remote = cli(['serve', '--bind', '0.0.0.0', img]);
  assert.is(remote.status, 1);
  assert.match(
    remote.stderr,
    /not a loopback address: NBD here has no TLS or authentication; add --allow-remote-without-tls/,
  );
  assert.is(remote.stderr.trim().split('\n').length, 1);
  const both = cli(['serve', '--socket', sock(dir), '-p', '10809', img]);
  assert.is(both.status, 1);
  assert.match(both.stderr, /--socket and --port exclude each other/);
  const missing = cli(['serve', '--socket', sock(dir), path.join(dir, 'nope.raw')]);
  assert.is(missing.status, 1);
  assert.match(missing.stderr, /no such file/);
});

test('a client breaking the protocol is dropped; the others go on', async () => {
  const img = path.join(dir, 'disk.raw');
  sparseImage(img, 16 * MiB, [[0, 1]]);
  const s = await serve(['--socket', sock(dir), img]);
  try {
    const good = await openNbd(s.url);
    const bad = net.connect(sock(dir));
    await new Promise((r) => bad.once('data', r));
    bad.write(Buffer.alloc(64, 0xee));
    await new Promise((r) => bad.once('close', r));
    assert.is((await good.read(0, 4096)).length, 4096);
    await good.close();
    assert.match(s.stderr(), /client \d+: protocol error/);
  } finally {
    await s.stop();
  }
});

test('SIGTERM while a client writes: the requests in flight complete, the image is flushed, exit 0', async () => {
  const img = path.join(dir, 'disk.raw');
  sparseImage(img, 64 * MiB, []);
  const s = await serve(['--socket', sock(dir), img]);
  const b = await openNbd(s.url);
  const writes = Array.from({ length: 16 }, (_, i) =>
    b.write(i * 4 * MiB, Buffer.alloc(4 * MiB, 0x42)).then(
      () => 'ok',
      (e: Error) => e.message,
    ),
  );
  const code = s.stop();
  const results = await Promise.all(writes);
  assert.is(await code, 0, s.stderr());
  await b.close();
  const landed = results.filter((r) => r === 'ok').length;
  const data = fs.readFileSync(img);
  for (let i = 0; i < landed; i++)
    assert.ok(
      data.subarray(i * 4 * MiB, (i + 1) * 4 * MiB).every((x) => x === 0x42),
      `write ${i} landed`,
    );
  for (const r of results) assert.ok(r === 'ok' || /shutting down|closed/.test(r), r);
});

test.run();
