// NbdServer as a library, over the core's in-memory backend: what it refuses and how,
// and how it shuts down. Real clients are in serve.ts; these are the edges.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { MemoryBackend } from '@blockconv/core';
import { NbdConnection, NbdServer, openNbd } from '../../src/index.js';
import { MiB, failure, tmpDir } from '../helpers.js';

const test = suite('NbdServer');
let dir: string;
test.before.each(() => {
  dir = tmpDir();
});
test.after.each(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

async function served(
  backend: MemoryBackend,
  options: ConstructorParameters<typeof NbdServer>[1] = {},
): Promise<{ server: NbdServer; url: string; sock: string }> {
  const server = new NbdServer(backend, options);
  const sock = path.join(dir, 's.sock');
  await server.listen({ path: sock });
  return { server, url: `nbd+unix:///?socket=${sock}`, sock };
}

test('readOnly over a writable backend: writes, zeroes and trims are refused (EPERM) and change nothing', async () => {
  const backend = new MemoryBackend({ size: 16 * MiB, canZero: true, canDiscard: true });
  await backend.write(0, Buffer.alloc(4096, 7));
  const { server, sock } = await served(backend, { readOnly: true });
  // The connection itself, not a backend: it sends what the caller asks, flags or not.
  const c = await NbdConnection.open({ path: sock }, { exportName: '', location: 'test', timeoutMs: 5000 });
  for (const op of [
    () => c.write(0, Buffer.alloc(4096, 1), false),
    () => c.writeZeroes(0, 4096, {}),
    () => c.trim(0, 4096),
  ]) {
    const e = await failure(op);
    assert.is(e.code, 'EACCES', e.message);
    assert.match(e.message, /read-only/);
  }
  assert.ok(
    Buffer.from(await backend.read(0, 4096)).every((x) => x === 7),
    'unchanged',
  );
  const back = Buffer.alloc(4096);
  await c.read(0, 4096, back);
  assert.ok(
    back.every((x) => x === 7),
    'the connection still serves reads',
  );
  await c.close();
  await server.close();
});

test('out of bounds and oversized requests get error replies; the connection goes on', async () => {
  const backend = new MemoryBackend({ size: 64 * MiB });
  const { server, sock } = await served(backend);
  const c = await NbdConnection.open({ path: sock }, { exportName: '', location: 'test', timeoutMs: 5000 });
  const past = await failure(() => c.write(64 * MiB - 512, Buffer.alloc(4096), false));
  assert.is(past.code, 'EINVAL');
  assert.match(past.message, /past the end/);
  const big = await failure(() => c.read(0, 40 * MiB, Buffer.alloc(40 * MiB)));
  assert.is(big.code, 'EINVAL', 'EOVERFLOW');
  assert.match(big.message, /read of 41943040 bytes \(at most 33554432\)/);
  await c.write(0, Buffer.alloc(4096, 3), false);
  const back = Buffer.alloc(4096);
  await c.read(0, 4096, back);
  assert.ok(back.every((x) => x === 3));
  await c.close();
  await server.close();
});

test('close() answers the requests in flight, refuses new ones with ESHUTDOWN, and ends idle clients', async () => {
  const backend = new MemoryBackend({ size: 16 * MiB, latency: (op) => (op === 'write' ? 300 : 0) });
  const { server, url } = await served(backend);
  const b = await openNbd(url);
  const idle = await openNbd(url, { readOnly: true });
  const inFlight = b.write(0, Buffer.alloc(MiB, 5));
  await new Promise((r) => setTimeout(r, 50));
  const closing = server.close();
  await inFlight;
  const late = await failure(() => b.write(MiB, Buffer.alloc(4096)));
  assert.match(late.message, /shutting down|closed/);
  const start = Date.now();
  await closing;
  assert.ok(Date.now() - start < 3000, 'idle clients do not hold the shutdown');
  assert.ok(
    Buffer.from(await backend.read(0, MiB)).every((x) => x === 5),
    'the write in flight landed',
  );
  await b.close();
  await idle.close();
});

test.run();
