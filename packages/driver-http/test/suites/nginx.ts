// Images on Debian's nginx: raw and qcow2 over Range requests, a location without Range,
// TLS with a self-signed CA, Basic authentication, 404 and 403.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { conformance } from '@blockconv/core/testkit';
import { HttpRangeBackend, HttpStreamBackend, openHttp } from '../../src/index.js';
import { MiB, cli, compare, failure, nginx, run, sparseImage, tmpDir, type Nginx } from '../helpers.js';

const dir = tmpDir();
const root = path.join(dir, 'www');
fs.mkdirSync(root);
const raw = path.join(root, 'disk.raw');
sparseImage(raw, 64 * MiB, [
  [0, 2],
  [9, 1],
  [30, 5],
  [63, 1],
]);
const qcow2 = path.join(root, 'disk.qcow2');
run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
// A qcow2 whose clusters lie in the file in the reverse of their guest order, over more
// than the 32 MiB a Range-less stream keeps behind it: reading it needs random access.
const reversed = path.join(root, 'reversed.qcow2');
run('qemu-img', ['create', '-q', '-f', 'qcow2', reversed, '64M']);
run('qemu-io', [
  '-f',
  'qcow2',
  ...Array.from({ length: 48 }, (_, i) => ['-c', `write -P ${i + 1} ${47 - i}M 1M`]).flat(),
  reversed,
]);
const zqcow2 = path.join(root, 'disk-zstd.qcow2');
run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-c', '-o', 'compression_type=zstd', raw, zqcow2]);
let server: Nginx;

conformance('http (nginx, Range)', {
  readOnly: true,
  open: async () => {
    server ??= await nginx(dir, root);
    return {
      backend: await openHttp(`${server.http}/disk.raw`),
      openReadOnly: () => openHttp(`${server.http}/disk.raw`),
    };
  },
});

const test = suite('http on nginx');
let out: string;
test.before(async () => {
  server ??= await nginx(dir, root);
});
test.before.each(() => {
  out = tmpDir();
});
test.after.each(() => {
  fs.rmSync(out, { recursive: true, force: true });
});
test.after(async () => {
  await server.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

test('raw and qcow2 (plain, zstd-compressed) over Range requests convert identically', () => {
  for (const [name, fmt] of [
    ['disk.raw', 'raw'],
    ['disk.qcow2', 'qcow2'],
    ['disk-zstd.qcow2', 'qcow2'],
  ] as const) {
    const dst = path.join(out, `${name}.out`);
    const r = cli(['convert', '-O', 'raw', '-m', '8', '-W', `${server.http}/${name}`, dst]);
    assert.is(r.status, 0, r.stderr);
    assert.is(compare(path.join(root, name), dst, [fmt, 'raw']).status, 0, `${name} identical`);
  }
  const info = JSON.parse(cli(['info', '--output', 'json', `${server.http}/disk.qcow2`]).stdout) as {
    format: string;
    'virtual-size': number;
  };
  assert.is(info.format, 'qcow2');
  assert.is(info['virtual-size'], 64 * MiB);
});

test('a location without Range: a raw image streams in one pass; qcow2 is refused saying why', async () => {
  const b = await openHttp(`${server.http}/noranges/disk.raw`);
  assert.ok(b instanceof HttpStreamBackend, 'stream mode');
  await b.close();
  const dst = path.join(out, 'stream.raw');
  const r = cli(['convert', '-m', '8', '-W', `${server.http}/noranges/disk.raw`, dst]);
  assert.is(r.status, 0, r.stderr);
  assert.is(compare(raw, dst).status, 0);
  const q = cli(['convert', '-O', 'raw', `${server.http}/noranges/reversed.qcow2`, path.join(out, 'q.raw')]);
  assert.is(q.status, 1);
  assert.match(
    q.stderr,
    /does not take Range requests, so the image can only be read in one pass.*formats such as qcow2 need random access/,
  );
  assert.is(q.stderr.trim().split('\n').length, 1);
});

test('https: refused without the CA (naming ca=), identical with --source-opts ca=', () => {
  const url = `${server.https}/disk.qcow2`;
  const bad = cli(['info', url]);
  assert.is(bad.status, 1);
  assert.match(bad.stderr, /TLS: .*(self.signed|certificate).*ca=FILE/i);
  const dst = path.join(out, 'tls.raw');
  const r = cli(['convert', '-O', 'raw', '--source-opts', `ca=${server.cert}`, url, dst]);
  assert.is(r.status, 0, r.stderr);
  assert.is(compare(qcow2, dst, ['qcow2', 'raw']).status, 0);
});

test('Basic authentication: 401 without credentials; URL or password-file credentials work and are never printed', async () => {
  const url = `${server.http}/private/disk.raw`;
  const none = await failure(() => openHttp(url));
  assert.is(none.code, 'EACCES');
  assert.match(none.message, /HTTP 401 Unauthorized: the server wants credentials/);
  const withUrl = `http://${server.user}:${server.password}@${url.slice('http://'.length)}`;
  const b = await openHttp(withUrl);
  assert.ok(b instanceof HttpRangeBackend);
  assert.not.match(b.location, new RegExp(server.password));
  await b.close();
  const pw = path.join(out, 'pw');
  fs.writeFileSync(pw, `${server.password}\n`);
  const dst = path.join(out, 'auth.raw');
  const r = cli(['convert', '--output', 'json', '--source-opts', `user=${server.user},password-file=${pw}`, url, dst]);
  assert.is(r.status, 0, r.stderr);
  assert.is(compare(raw, dst).status, 0);
  const wrong = cli([
    'convert',
    `http://${server.user}:wrong-password-xyz@${url.slice('http://'.length)}`,
    path.join(out, 'x.raw'),
  ]);
  assert.is(wrong.status, 1);
  assert.match(wrong.stderr, /HTTP 401/);
  for (const text of [r.stdout, r.stderr, wrong.stdout, wrong.stderr]) {
    assert.not.match(text, new RegExp(server.password));
    assert.not.match(text, /wrong-password-xyz/);
  }
});

test('404 is ENOENT, 403 EACCES, one line each; a redirect is followed', async () => {
  const missing = cli(['info', `${server.http}/nope.raw`]);
  assert.is(missing.status, 1);
  assert.match(missing.stderr, /open: HTTP 404 Not Found: no image at this URL/);
  const forbidden = await failure(() => openHttp(`${server.http}/forbidden/disk.raw`));
  assert.is(forbidden.code, 'EACCES');
  assert.match(forbidden.message, /HTTP 403 Forbidden/);
  const moved = await openHttp(`${server.http}/moved/disk.raw`);
  assert.is(moved.size, 64 * MiB);
  assert.match((await moved.info()).url as string, /\/disk\.raw$/);
  await moved.close();
});

test('-n and writes are refused: http is read-only', () => {
  const r = cli(['convert', raw, `${server.http}/copy.raw`]);
  assert.is(r.status, 1);
  assert.match(r.stderr, /the http driver only reads \(a source, never a target\)/);
});

test.run();
