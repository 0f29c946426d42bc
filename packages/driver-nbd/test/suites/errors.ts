// Failures end in one clear error, in bounded time: no server, not an NBD server, a server
// that stalls or dies mid-request, error replies, a full disk, and protocol violations.
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { openNbd, protocol } from '../../src/index.js';
import { MiB, failure, freePort, nbdkit, tmpDir } from '../helpers.js';

const test = suite('nbd errors');
let dir: string;
test.before.each(() => {
  dir = tmpDir();
});
test.after.each(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A TCP server on loopback whose connections `onConnection` handles. */
async function fakeServer(onConnection: (s: net.Socket) => void): Promise<{ url: string; close(): void }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on('error', () => {});
    onConnection(s);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  return {
    url: `nbd://127.0.0.1:${port}/`,
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

/** The greeting of a fixed newstyle server, then a GO exchange answering `size`, then `after`. */
function handshakeThen(size: number, after: (s: net.Socket) => void, structured = false): (s: net.Socket) => void {
  return (s) => {
    const g = Buffer.alloc(18);
    g.writeBigUInt64BE(protocol.NBDMAGIC, 0);
    g.writeBigUInt64BE(protocol.IHAVEOPT, 8);
    g.writeUInt16BE(protocol.FLAG_FIXED_NEWSTYLE | protocol.FLAG_NO_ZEROES, 16);
    s.write(g);
    let buf = Buffer.alloc(0);
    let flagsRead = false;
    const reply = (option: number, type: number, data = Buffer.alloc(0)): void => {
      const h = Buffer.alloc(20);
      h.writeBigUInt64BE(protocol.OPTION_REPLY_MAGIC, 0);
      h.writeUInt32BE(option, 8);
      h.writeUInt32BE(type, 12);
      h.writeUInt32BE(data.length, 16);
      s.write(Buffer.concat([h, data]));
    };
    const onData = (d: Buffer): void => {
      buf = Buffer.concat([buf, d]);
      if (!flagsRead && buf.length >= 4) {
        buf = buf.subarray(4);
        flagsRead = true;
      }
      while (flagsRead && buf.length >= 16) {
        const option = buf.readUInt32BE(8);
        const len = buf.readUInt32BE(12);
        if (buf.length < 16 + len) return;
        buf = buf.subarray(16 + len);
        if (option === protocol.Option.GO) {
          const info = Buffer.alloc(12);
          info.writeUInt16BE(protocol.Info.EXPORT, 0);
          info.writeBigUInt64BE(BigInt(size), 2);
          info.writeUInt16BE(protocol.Flag.HAS_FLAGS | protocol.Flag.SEND_FLUSH, 10);
          reply(option, protocol.OptionReply.INFO, info);
          reply(option, protocol.OptionReply.ACK);
          s.off('data', onData);
          after(s);
          return;
        }
        if (option === protocol.Option.STRUCTURED_REPLY && structured) reply(option, protocol.OptionReply.ACK);
        else reply(option, protocol.OptionError.UNSUP);
      }
    };
    s.on('data', onData);
  };
}

test('no server: a missing socket and a closed port are ECONNREFUSED, saying so', async () => {
  const e1 = await failure(() => openNbd(`nbd+unix:///?socket=${path.join(dir, 'none.sock')}`));
  assert.is(e1.code, 'ECONNREFUSED');
  assert.match(e1.message, /open: no NBD server at this socket/);
  const port = await freePort();
  const e2 = await failure(() => openNbd(`nbd://127.0.0.1:${port}/`));
  assert.is(e2.code, 'ECONNREFUSED');
  assert.match(e2.message, /connection refused/);
});

test('not an NBD server: the handshake says what it got', async () => {
  const http = await fakeServer((s) => s.end('HTTP/1.1 400 Bad Request\r\n\r\n'));
  const e = await failure(() => openNbd(http.url));
  http.close();
  assert.is(e.code, 'EIO');
  assert.match(e.message, /not an NBD server/);
});

test('a server that says nothing: the handshake times out after timeout=1', async () => {
  const silent = await fakeServer(() => {});
  const start = Date.now();
  const e = await failure(() => openNbd(silent.url, { options: { timeout: '1' } }));
  silent.close();
  assert.is(e.code, 'ETIMEDOUT');
  assert.match(e.message, /no answer from the NBD server for 1 s \(during the handshake\)/);
  assert.ok(Date.now() - start < 5000);
});

test('a server that stops answering mid-transfer: requests fail with ETIMEDOUT, naming how many wait', async () => {
  const server = await nbdkit(dir, ['--filter=delay', 'memory', '16M', 'delay-read=10']);
  const b = await openNbd(server.url, { options: { timeout: '1', connections: '1' } });
  const start = Date.now();
  const reads = [b.read(0, 4096), b.read(MiB, 4096)];
  const e = await failure(() => reads[0]!);
  await failure(() => reads[1]!);
  assert.is(e.code, 'ETIMEDOUT');
  assert.match(
    e.message,
    /read at offset 0 \(\+4096\): no answer from the NBD server for 1 s \(2 request\(s\) waiting\)/,
  );
  assert.ok(Date.now() - start < 5000, 'within the timeout and a little');
  const later = await failure(() => b.read(0, 4096));
  assert.is(later.code, 'ETIMEDOUT', 'the connection stays failed');
  await b.close();
  await server.stop();
});

test('the server killed mid-copy: every request in flight fails at once with ECONNRESET', async () => {
  const server = await nbdkit(dir, ['--filter=delay', 'memory', '64M', 'delay-read=1']);
  const b = await openNbd(server.url);
  const reads = Array.from({ length: 8 }, (_, i) =>
    b.read(i * MiB, MiB).then(
      () => null,
      (err: Error & { code?: string }) => err,
    ),
  );
  await new Promise((r) => setTimeout(r, 200));
  const start = Date.now();
  server.kill();
  const errors = await Promise.all(reads);
  assert.ok(Date.now() - start < 3000);
  for (const [i, e] of errors.entries()) {
    assert.ok(e, `read ${i} failed`);
    assert.is(e!.code, 'ECONNRESET');
    assert.match(
      e!.message,
      new RegExp(`read at offset ${i * MiB} \\(\\+${MiB}\\): the NBD server closed the connection`),
    );
  }
  await b.close();
});

test('error replies become the matching codes, with the offset of the request', async () => {
  const server = await nbdkit(dir, [
    '--filter=error',
    'memory',
    '16M',
    'error-pread=EIO',
    'error-pread-rate=1',
    'error-pwrite=ENOSPC',
    'error-pwrite-rate=1',
  ]);
  const b = await openNbd(server.url);
  const r = await failure(() => b.read(2 * MiB, 65536));
  assert.is(r.code, 'EIO');
  assert.match(r.message, /read at offset 2097152 \(\+65536\): input\/output error/);
  const w = await failure(() => b.write(MiB, Buffer.alloc(4096)));
  assert.is(w.code, 'ENOSPC');
  assert.match(w.message, /write at offset 1048576 \(\+4096\): no space left on device/);
  // An error reply does not break the connection.
  await b.flush();
  await b.close();
  await server.stop();
});

test('a full disk (nbdkit full): ENOSPC', async () => {
  const server = await nbdkit(dir, ['full', '16M']);
  const b = await openNbd(server.url);
  const e = await failure(() => b.write(0, Buffer.alloc(65536, 1)));
  assert.is(e.code, 'ENOSPC');
  await b.close();
  await server.stop();
});

test('protocol violations: a reply to a cookie never sent, a bad magic', async () => {
  const cases: [string, (s: net.Socket) => void, RegExp][] = [
    [
      'unknown cookie',
      (s) =>
        s.once('data', () => {
          const h = Buffer.alloc(16);
          h.writeUInt32BE(protocol.SIMPLE_REPLY_MAGIC, 0);
          h.writeUInt32BE(77, 12);
          s.write(h);
        }),
      /protocol error: reply to cookie 77, which no request in flight has/,
    ],
    [
      'bad magic',
      (s) => s.once('data', () => s.write(Buffer.alloc(16, 0xab))),
      /protocol error: bad reply magic 0xabababab/,
    ],
  ];
  for (const [what, after, re] of cases) {
    const fake = await fakeServer(handshakeThen(MiB, after));
    const b = await openNbd(fake.url);
    const e = await failure(() => b.read(0, 4096));
    assert.is(e.code, 'EIO', what);
    assert.match(e.message, re, what);
    await b.close();
    fake.close();
  }
});

test('a read reply that does not cover the whole request is a protocol error, not stale bytes', async () => {
  const fake = await fakeServer(
    handshakeThen(
      MiB,
      (s) =>
        s.once('data', (req: Buffer) => {
          // One structured chunk: NONE with DONE, for the read's cookie.
          const h = Buffer.alloc(20);
          h.writeUInt32BE(protocol.STRUCTURED_REPLY_MAGIC, 0);
          h.writeUInt16BE(protocol.REPLY_FLAG_DONE, 4);
          h.writeUInt16BE(protocol.ReplyType.NONE, 6);
          req.copy(h, 8, 8, 16);
          s.write(h);
        }),
      true,
    ),
  );
  const b = await openNbd(fake.url);
  const e = await failure(() => b.read(0, 4096));
  assert.is(e.code, 'EIO');
  assert.match(e.message, /protocol error: read reply covering 0 of the 4096 bytes asked at 0/);
  await b.close();
  fake.close();
});

test('a malformed export size or block sizes from the server fail the open, naming them', async () => {
  const fake = await fakeServer(handshakeThen(2 ** 60, () => {}));
  const e = await failure(() => openNbd(fake.url));
  fake.close();
  assert.match(e.message, /export size beyond 2\^53/);
});

test.run();
