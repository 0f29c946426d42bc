// Failures injected by a server of our own: resets mid-body and 5xx retried (resuming
// where the response stopped), stalls that time out, redirect loops, no size, no Range,
// no HEAD, and a server that is not there.
import * as crypto from 'node:crypto';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { HttpRangeBackend, HttpStreamBackend, openHttp } from '../../src/index.js';
import { MiB, failure, faultServer, freePort } from '../helpers.js';

const image = crypto.randomBytes(8 * MiB);
const test = suite('http faults');

test('connection resets mid-body are retried from the byte reached', async () => {
  const s = await faultServer(image);
  const b = await openHttp(`${s.url}/disk.raw`);
  s.faults.resetAfter = 300_000;
  s.faults.resets = 3;
  const got = Buffer.from(await b.read(0, 4 * MiB));
  assert.ok(got.equals(image.subarray(0, 4 * MiB)), 'content exact');
  assert.is((await b.info()).retries, 3);
  // The retries asked for the rest only: bytes=300000-..., then 600000-..., ...
  const ranges = s.requests.filter((r) => r.startsWith('GET')).map((r) => Number(/bytes=(\d+)-/.exec(r)![1]));
  assert.equal(ranges.slice(0, 4), [0, 300_000, 600_000, 900_000]);
  await b.close();
  await s.close();
});

test('5xx and 429 are retried with backoff; past retries= the error names the status and the count', async () => {
  const s = await faultServer(image, {});
  const b = await openHttp(`${s.url}/disk.raw`, { options: { retries: '2' } });
  s.faults.failStatus = 503;
  s.faults.failures = 2;
  assert.ok(Buffer.from(await b.read(MiB, MiB)).equals(image.subarray(MiB, 2 * MiB)));
  s.faults.failStatus = 502;
  s.faults.failures = 10;
  const e = await failure(() => b.read(0, 4096));
  assert.is(e.code, 'EIO');
  assert.match(e.message, /read at offset 0 \(\+4096\): HTTP 502 Bad Gateway \(after 2 retries\)/);
  await b.close();
  await s.close();
});

test('a server that stalls: timeout= fails the request after its retries, in bounded time', async () => {
  const s = await faultServer(image);
  const b = await openHttp(`${s.url}/disk.raw`, { options: { timeout: '1', retries: '1' } });
  s.faults.stallMs = 5000;
  s.faults.stalls = 5;
  const start = Date.now();
  const e = await failure(() => b.read(0, 4096));
  assert.is(e.code, 'ETIMEDOUT');
  assert.match(e.message, /no answer from 127\.0\.0\.1:\d+ for 1 s \(after 1 retry\)/);
  assert.ok(Date.now() - start < 5000);
  await b.close();
  await s.close();
});

test('redirects are followed (301), a loop is cut after 10', async () => {
  const s = await faultServer(image);
  const b = await openHttp(`${s.url}/redirect`);
  assert.is(b.size, image.length);
  assert.ok(Buffer.from(await b.read(0, 65536)).equals(image.subarray(0, 65536)));
  await b.close();
  const e = await failure(() => openHttp(`${s.url}/loop`));
  assert.match(e.message, /more than 10 redirects/);
  await s.close();
});

test('no Content-Length: refused, an image needs a size', async () => {
  const s = await faultServer(image, { noLength: true, noRange: true });
  const e = await failure(() => openHttp(`${s.url}/disk.raw`));
  assert.is(e.code, 'ENOTSUP');
  assert.match(e.message, /tells no size/);
  await s.close();
});

test('no HEAD (405): the size comes from a one-byte GET', async () => {
  const s = await faultServer(image, { noHead: true });
  const b = await openHttp(`${s.url}/disk.raw`);
  assert.ok(b instanceof HttpRangeBackend);
  assert.is(b.size, image.length);
  await b.close();
  await s.close();
});

test('no Range: reads in ascending order stream; reads a little behind come from the look-behind; a reset restarts and skips', async () => {
  // Two resets: the first hits open's one-byte probe (which drops its answer anyway),
  // the second the stream, 3 MiB in.
  const s = await faultServer(image, { noRange: true, resetAfter: 3 * MiB, resets: 2 });
  const b = await openHttp(`${s.url}/disk.raw`);
  assert.ok(b instanceof HttpStreamBackend);
  const head = Buffer.from(await b.read(0, 4096));
  assert.ok(head.equals(image.subarray(0, 4096)), 'a probe of the head');
  const parts = await Promise.all([0, 1, 2, 3, 4, 5, 6, 7].map((i) => b.read(i * MiB, MiB)));
  assert.ok(Buffer.concat(parts.map((p) => Buffer.from(p))).equals(image), 'all of it, in parallel reads');
  assert.is((await b.info()).retries, 1, 'one restart');
  await b.close();
  await s.close();
});

test('the image replaced on the server (another ETag): reads fail with 412 instead of mixing versions', async () => {
  const s = await faultServer(image, { etag: '"v1"' });
  const b = await openHttp(`${s.url}/disk.raw`);
  assert.ok(Buffer.from(await b.read(0, 4096)).equals(image.subarray(0, 4096)));
  s.faults.etag = '"v2"';
  const e = await failure(() => b.read(4096, 4096));
  assert.is(e.code, 'EIO');
  assert.match(
    e.message,
    /read at offset 4096 \(\+4096\): HTTP 412 Precondition Failed: the image changed on the server/,
  );
  assert.ok(
    s.requests.some((r) => r.startsWith('GET')),
    'GETs were sent',
  );
  await b.close();
  await s.close();
});

test('no Range: close while a read waits rejects it, and nothing is fetched after', async () => {
  const s = await faultServer(image, { noRange: true, stallMs: 300, stalls: 10 });
  const b = await openHttp(`${s.url}/disk.raw`, { options: { retries: '0' } });
  const waiting = b.read(0, MiB).then(
    () => 'read',
    (e: Error) => e.message,
  );
  await new Promise((r) => setTimeout(r, 100));
  await b.close();
  assert.match(await waiting, /closed while reads waited/);
  const sent = s.requests.length;
  await new Promise((r) => setTimeout(r, 700));
  assert.is(s.requests.length, sent, 'no request after close');
  await s.close();
});

test('nobody listening: ECONNREFUSED after the retries', async () => {
  const port = await freePort();
  const start = Date.now();
  const e = await failure(() => openHttp(`http://127.0.0.1:${port}/disk.raw`, { options: { retries: '1' } }));
  assert.is(e.code, 'ECONNREFUSED');
  assert.match(e.message, /open: connection refused by 127\.0\.0\.1:\d+ \(after 1 retry\)/);
  assert.ok(Date.now() - start < 3000);
});

test('bad URLs and options are EINVAL naming them', async () => {
  for (const [url, opts, re] of [
    ['http://[bad/x', {}, /not a valid URL/],
    ['http://h/x#frag', {}, /no fragment/],
    ['http://h/x', { connections: '0' }, /connections=0/],
    ['http://h/x', { retries: 'many' }, /retries=many/],
  ] as const) {
    const e = await failure(() => openHttp(url, { options: opts }));
    assert.is(e.code, 'EINVAL', url);
    assert.match(e.message, re);
  }
});

test.run();
