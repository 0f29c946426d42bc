// The binding against the real NFS-Ganesha of tools/nfs-server.sh.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { NfsContext, constants, prepareUrl, type NfsError } from '../../src/index.js';
import { BASE_URL, EXPORT_DIR, ensureServer, scratchName } from '../server.js';

ensureServer();
const { O_RDWR, O_CREAT, O_TRUNC, O_RDONLY } = constants;

async function rejects(p: Promise<unknown>, code: string): Promise<Error> {
  try {
    await p;
  } catch (err) {
    assert.is((err as { code?: string }).code, code, `code of ${(err as Error).message}`);
    return err as Error;
  }
  throw new Error(`expected a rejection with ${code}`);
}

for (const version of [3, 4]) {
  const test = suite(`libnfs binding (NFSv${version})`);
  const query = version === 4 ? '?version=4' : '';

  test('mount, create, write, read back, fstat, truncate, fsync, close', async () => {
    const name = scratchName('bind');
    const ctx = new NfsContext({ timeoutMs: 10000 });
    try {
      const m = await ctx.mount(`${BASE_URL}/${name}${query}`);
      assert.equal([m.server, m.export, m.file], ['127.0.0.1', '/export', `/${name}`]);
      // libnfs 4.0 learns rsize/wsize over NFSv3 only (v4: 0, see README).
      if (version === 3) assert.ok(ctx.readMax >= 4096 && ctx.writeMax >= 4096);
      const h = await ctx.open(m.file, O_RDWR | O_CREAT | O_TRUNC, 0o644);
      await ctx.ftruncate(h, 1 << 20);
      // libnfs 4.0 cannot encode an NFSv4 WRITE of more than about 3.9 KiB.
      const data = Buffer.alloc(version === 3 ? 70000 : 2048, 0x5a);
      assert.is(await ctx.pwrite(h, data, 1000), data.length);
      const back = Buffer.alloc(data.length);
      assert.is(await ctx.pread(h, back, 1000), back.length);
      assert.ok(back.equals(data));
      // A read across EOF is short.
      assert.is(await ctx.pread(h, Buffer.alloc(4096), (1 << 20) - 100), 100);
      assert.is((await ctx.fstat(h)).size, 1 << 20);
      await ctx.fsync(h);
      await ctx.close(h);
      await rejects(ctx.fstat(h), 'EBADF');
      assert.is(fs.statSync(path.join(EXPORT_DIR, name)).size, 1 << 20);
      assert.is(ctx.outstanding, 0);
    } finally {
      ctx.destroy();
      fs.rmSync(path.join(EXPORT_DIR, name), { force: true });
    }
  });

  test('8 concurrent reads are in flight together on one connection', async () => {
    const name = scratchName('par');
    fs.writeFileSync(path.join(EXPORT_DIR, name), Buffer.alloc(8 * 65536, 1));
    const ctx = new NfsContext();
    try {
      const m = await ctx.mount(`${BASE_URL}/${name}${query}`);
      const h = await ctx.open(m.file, O_RDONLY);
      const sent = ctx.submitted;
      assert.ok(sent >= 2, `mount and open counted: ${sent}`);
      const reads = Array.from({ length: 8 }, (_, i) => ctx.pread(h, Buffer.alloc(65536), i * 65536));
      assert.is(ctx.outstanding, 8);
      assert.is(ctx.submitted, sent + 8);
      assert.equal(await Promise.all(reads), Array(8).fill(65536));
      // When the first reply arrived, others were still outstanding: they overlapped.
      assert.ok(ctx.peakOutstanding > 1, `peak ${ctx.peakOutstanding}`);
      assert.is(ctx.outstanding, 0);
    } finally {
      ctx.destroy();
      fs.rmSync(path.join(EXPORT_DIR, name), { force: true });
    }
  });

  test('two contexts with their own client names on one file at once', async () => {
    const name = scratchName('two');
    fs.writeFileSync(path.join(EXPORT_DIR, name), Buffer.alloc(65536, 3));
    const a = new NfsContext({ clientName: `test-a-${process.pid}` });
    const b = new NfsContext({ clientName: `test-b-${process.pid}` });
    try {
      const [ma, mb] = await Promise.all([
        a.mount(`${BASE_URL}/${name}${query}`),
        b.mount(`${BASE_URL}/${name}${query}`),
      ]);
      const ha = await a.open(ma.file, O_RDWR);
      const hb = await b.open(mb.file, O_RDWR);
      // Each writes, the other reads it back: both opens stay valid side by side.
      assert.is(await a.pwrite(ha, Buffer.alloc(1024, 0xa), 0), 1024);
      assert.is(await b.pwrite(hb, Buffer.alloc(1024, 0xb), 1024), 1024);
      const buf = Buffer.alloc(2048);
      assert.is(await b.pread(hb, buf, 0), 2048);
      assert.is(buf[0], 0xa);
      assert.is(await a.pread(ha, buf, 0), 2048);
      assert.is(buf[1024], 0xb);
      await Promise.all([a.close(ha), b.close(hb)]);
    } finally {
      a.destroy();
      b.destroy();
      fs.rmSync(path.join(EXPORT_DIR, name), { force: true });
    }
  });

  test('destroy with requests in flight rejects them with ECANCELED, then EBADF', async () => {
    const name = scratchName('cancel');
    fs.writeFileSync(path.join(EXPORT_DIR, name), Buffer.alloc(1 << 20, 2));
    const ctx = new NfsContext();
    const m = await ctx.mount(`${BASE_URL}/${name}${query}`);
    const h = await ctx.open(m.file, O_RDONLY);
    const reads = Array.from({ length: 4 }, () =>
      ctx.pread(h, Buffer.alloc(1 << 20), 0).then(
        () => 'ok',
        (e: { code: string }) => e.code,
      ),
    );
    ctx.destroy();
    ctx.destroy();
    assert.equal(await Promise.all(reads), Array(4).fill('ECANCELED'));
    assert.is(ctx.outstanding, 0);
    await rejects(ctx.pread(h, Buffer.alloc(1), 0), 'EBADF');
    fs.rmSync(path.join(EXPORT_DIR, name), { force: true });
  });

  test('missing file: ENOENT with libnfs text', async () => {
    const ctx = new NfsContext();
    try {
      await ctx.mount(`${BASE_URL}/x${query}`);
      const e = await rejects(ctx.open('/no-such-file', O_RDONLY), 'ENOENT');
      assert.match(e.message, version === 3 ? /no-such-file/ : /NFS4ERR_NOENT/);
    } finally {
      ctx.destroy();
    }
  });

  test('wrong export is refused', async () => {
    const ctx = new NfsContext();
    try {
      const e = await ctx.mount(`nfs://127.0.0.1/no-such-export/x${query}`).then(
        () => undefined,
        (err: NfsError) => err,
      );
      assert.ok(e, 'mount fails');
      assert.ok(['EACCES', 'ENOENT'].includes(e!.code), e!.message);
    } finally {
      ctx.destroy();
    }
  });

  if (version === 4) {
    test('libnfs 4.0 limits on NFSv4: large WRITEs fail to encode, O_CREAT is exclusive', async () => {
      const name = scratchName('v4');
      const ctx = new NfsContext();
      try {
        const m = await ctx.mount(`${BASE_URL}/${name}${query}`);
        const h = await ctx.open(m.file, O_RDWR | O_CREAT, 0o644);
        const e = await rejects(ctx.pwrite(h, Buffer.alloc(8192), 0), 'EIO');
        assert.match(e.message, /encode/);
        await rejects(ctx.open(m.file, O_RDWR | O_CREAT, 0o644), 'EEXIST');
        void h; // (a CLOSE after that failed open gets NFS4ERR_BAD_SEQID: destroy instead)
      } finally {
        ctx.destroy();
        fs.rmSync(path.join(EXPORT_DIR, name), { force: true });
      }
    });
  }

  test('connection refused', async () => {
    const ctx = new NfsContext({ timeoutMs: 5000 });
    try {
      // Port 1: nothing listens there.
      await rejects(ctx.mount(`nfs://127.0.0.1:1/export/x${query}`), 'ECONNREFUSED');
    } finally {
      ctx.destroy();
    }
  });
  test.run();
}

const res = suite('libnfs resources');
res('no fd left behind after mount/open/destroy cycles; an idle connection does not spin', async () => {
  const fds = () => fs.readdirSync('/proc/self/fd').length;
  const before = fds();
  for (let i = 0; i < 10; i++) {
    const ctx = new NfsContext();
    const m = await ctx.mount(`${BASE_URL}/x`);
    await ctx.open(m.export === '/export' ? '/' : m.file, O_RDONLY).catch(() => 0);
    ctx.destroy();
  }
  // uv_close completes on the next loop turn.
  await new Promise((r) => setImmediate(r));
  assert.is(fds(), before, 'fd count back where it was');

  const ctx = new NfsContext();
  try {
    await ctx.mount(`${BASE_URL}/x`);
    // Level-triggered UV_WRITABLE left armed would burn a core here.
    const cpu = process.cpuUsage();
    await new Promise((r) => setTimeout(r, 300));
    const used = process.cpuUsage(cpu);
    assert.ok(used.user + used.system < 100_000, `idle connection used ${used.user + used.system} us of CPU in 300 ms`);
  } finally {
    ctx.destroy();
  }
});
res('works in a worker thread; a worker exiting with a context open and busy cleans up', async () => {
  // The built module (dist/): workers cannot load TypeScript. The loop is the worker's
  // own (napi_get_uv_event_loop); its exit runs the binding's env cleanup hook.
  const dist = new URL('../../dist/index.js', import.meta.url).href;
  const code = `import { NfsContext } from ${JSON.stringify(dist)};
    import { parentPort } from 'node:worker_threads';
    const c = new NfsContext();
    await c.mount('${BASE_URL}/x');
    parentPort.postMessage(c.readMax);
    c.open('/', 0, 0).catch(() => {});
    process.exit(0);`;
  const worker = new Worker(new URL(`data:text/javascript,${encodeURIComponent(code)}`));
  const readMax = await new Promise((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  assert.ok((readMax as number) > 0);
  assert.is(await new Promise((resolve) => worker.once('exit', resolve)), 0);
});
res.run();

const urls = suite('libnfs prepareUrl');
urls('checks options, maps host:port to nfsport, resolves names', async () => {
  assert.is(await prepareUrl('nfs://127.0.0.1/export/a?version=4&uid=0'), 'nfs://127.0.0.1/export/a?version=4&uid=0');
  assert.is(await prepareUrl('nfs://localhost:2049/export/a'), 'nfs://127.0.0.1/export/a?nfsport=2049');
  await rejects(prepareUrl('nfs://127.0.0.1/export/a?bogus=1'), 'EINVAL');
  await rejects(prepareUrl('nfs://127.0.0.1/export/a?version=7'), 'EINVAL');
  await rejects(prepareUrl('http://127.0.0.1/export/a'), 'EINVAL');
  await rejects(prepareUrl('nfs://no-such-host.invalid/export/a'), 'ENOTFOUND');
});
urls.run();
