import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  BLOCK_API_VERSION,
  ungated,
  BlockError,
  DriverRegistry,
  MemoryBackend,
  convert,
  createMemoryDriver,
  parseLocation,
  redactCredentials,
  redactLocation,
  resolveRelative,
  type FormatDriver,
  type ProtocolDriver,
} from '../src/index.js';

const identity: FormatDriver = {
  apiVersion: BLOCK_API_VERSION,
  kind: 'format',
  name: 'raw',
  probe: () => 1,
  open: async (file) => file,
  create: async () => {},
  protocolSizeFor: (n) => n,
};

test('locations: plain paths are files, URLs pick a scheme, file:// URLs become paths', () => {
  assert.equal(parseLocation('disk.raw'), { scheme: 'file', location: 'disk.raw' });
  assert.equal(parseLocation('/a/b c.raw'), { scheme: 'file', location: '/a/b c.raw' });
  assert.equal(parseLocation('file:///a/b%20c.raw'), { scheme: 'file', location: '/a/b c.raw' });
  assert.equal(parseLocation('NFS://host/export/x'), { scheme: 'nfs', location: 'NFS://host/export/x' });
  assert.throws(() => parseLocation(''), /empty image location/);
});

test('a missing driver names the package to install (and the system library)', () => {
  const reg = new DriverRegistry();
  const err = (f: () => unknown): BlockError => {
    try {
      f();
    } catch (e) {
      return e as BlockError;
    }
    throw new Error('no error');
  };
  const nfs = err(() => reg.protocolFor('nfs://h/e/x.raw'));
  assert.is(nfs.code, 'ENODRIVER');
  assert.match(
    nfs.message,
    /no driver for scheme "nfs": install @blockconv\/driver-nfs \(needs libnfs \(Debian: libnfs-dev\)\)/,
  );
  assert.match(err(() => reg.protocolFor('iscsi://h/iqn/1')).message, /install @blockconv\/driver-iscsi/);
  assert.match(
    err(() => reg.format('qcow2')).message,
    /no driver for format "qcow2": install @blockconv\/driver-qcow2/,
  );
  assert.match(err(() => reg.protocolFor('/tmp/x')).message, /install @blockconv\/driver-raw/);
  assert.match(err(() => reg.protocolFor('weird://x')).message, /no driver for scheme "weird"/);
  reg.register(identity);
  assert.match(err(() => reg.format('vmdk')).message, /unknown format "vmdk" \(known: raw\)/);
});

test('drivers written against an API version this core does not know are refused, naming both', () => {
  assert.throws(
    () => new DriverRegistry().register({ ...identity, apiVersion: 3 as 2 }),
    /driver "raw" implements driver API version 3; this @blockconv\/core implements versions 1 and 2/,
  );
});

test('create + open through a protocol and the identity format; probe falls back to raw', async () => {
  const mem = createMemoryDriver();
  const reg = new DriverRegistry().register(mem, identity);
  const img = await reg.create('mem://a', 1 << 20);
  assert.is(img.size, 1 << 20);
  const again = await reg.open('mem://a');
  assert.is(ungated(ungated(again)), ungated(ungated(img)), 'the same memory image, behind the request gate');
  await assert.not.throws(() => reg.format('raw'));
});

test('an on-demand loader is asked for exactly what open and create need', async () => {
  const asked: string[] = [];
  const mem = createMemoryDriver();
  const reg = new DriverRegistry().setLoader(async (kind, name) => {
    asked.push(`${kind}:${name}`);
    if (kind === 'scheme' && name === 'mem') reg.register(mem);
    if (kind === 'format' && (name === 'raw' || name === '*')) reg.register(identity);
  });
  await reg.create('mem://b', 4096);
  assert.equal(asked, ['scheme:mem', 'format:raw']);
  await reg.open('mem://b');
  assert.equal(asked, ['scheme:mem', 'format:raw', 'format:*'], 'probing asks for every format');
  await reg.open('mem://b', { format: 'raw' });
  assert.is(asked.length, 3, 'nothing more once registered');
  const err = await reg.open('nfs://h/e/x').catch((e: BlockError) => e);
  assert.is(err.code, 'ENODRIVER');
  assert.ok(asked.includes('scheme:nfs'));
});

test('backing names resolve against the image, as QEMU does', () => {
  assert.is(resolveRelative('/data/vm/top.qcow2', 'base.raw'), '/data/vm/base.raw');
  assert.is(resolveRelative('/data/vm/top.qcow2', '/abs/base.raw'), '/abs/base.raw');
  assert.is(resolveRelative('top.qcow2', 'base.raw'), 'base.raw');
  assert.is(
    resolveRelative('nfs://h/export/dir/top.qcow2?version=4', 'base.qcow2'),
    'nfs://h/export/dir/base.qcow2?version=4',
  );
  assert.is(resolveRelative('nfs://h/export/top.qcow2', 'iscsi://t/iqn/1'), 'iscsi://t/iqn/1');
});

test('credentials in URLs are dropped from locations and error messages', () => {
  assert.is(redactLocation('iscsi://bob%secret@host/iqn.x/1'), 'iscsi://bob@host/iqn.x/1');
  assert.is(redactLocation('nfs://u:pw@host/export/f'), 'nfs://u@host/export/f');
  assert.is(redactLocation('/plain/path@odd'), '/plain/path@odd');
  assert.is(redactCredentials('copy iscsi://a%b@h/t/1 to nfs://c:d@h/e'), 'copy iscsi://a@h/t/1 to nfs://c@h/e');
  const e = new BlockError('EIO', 'failed', { location: 'iscsi://bob%secret@host/iqn.x/1', op: 'open' });
  assert.not.match(e.message, /secret/);
  assert.is(e.location, 'iscsi://bob@host/iqn.x/1');
});

/** A read-only protocol a third party might write: sources only, with one declared option. */
function sourceOnlyDriver(): ProtocolDriver & { opened: Array<Record<string, unknown>> } {
  const opened: Array<Record<string, unknown>> = [];
  return {
    apiVersion: BLOCK_API_VERSION,
    kind: 'protocol',
    name: 'demo',
    schemes: ['demo'],
    readOnly: true,
    opened,
    openOptions: [{ name: 'speed', description: 'how fast' }],
    async open(location, options) {
      opened.push({ location, readOnly: options.readOnly, options: options.options });
      return new MemoryBackend({ size: 1 << 20, location });
    },
  };
}

test('a read-only protocol opens read-only whatever is asked, and a convert to it says why it cannot', async () => {
  const demo = sourceOnlyDriver();
  const mem = createMemoryDriver();
  const reg = new DriverRegistry().register(demo, mem, identity);
  const img = await reg.open('demo://x', { readOnly: false });
  assert.ok(img.readOnly);
  assert.is(demo.opened[0]!.readOnly, true, 'the driver is asked for a read-only open');
  assert.match(img.readOnlyReason ?? '', /the demo driver only reads/);
  await mem.create!('mem://src', 1 << 20, {});
  const src = await reg.open('mem://src');
  const err = await convert({ sources: [src], target: img }).catch((e: unknown) => e as BlockError);
  assert.is(err.code, 'EROFS');
  assert.match(err.message, /the target is read-only: the demo driver only reads \(a source, never a target\)/);
  const created = await reg.create('demo://y', 1 << 20).catch((e: unknown) => e as BlockError);
  assert.is(created.code, 'EROFS');
  assert.match(created.message, /cannot create images/);
});

test('open options: declared ones reach the driver, an unknown one is refused with the ones that exist', async () => {
  const demo = sourceOnlyDriver();
  const reg = new DriverRegistry().register(demo, identity);
  await reg.open('demo://x', { options: { speed: 'fast' } });
  assert.equal(demo.opened[0]!.options, { speed: 'fast' });
  const err = await reg.open('demo://x', { options: { sped: 'fast' } }).catch((e: unknown) => e as BlockError);
  assert.is(err.code, 'EINVAL');
  assert.match(err.message, /unknown open option "sped" \(demo takes speed; raw takes none\)/);
  // create checks them before it creates (or truncates) anything.
  const mem = createMemoryDriver();
  const reg2 = new DriverRegistry().register(mem, identity);
  const refused = await reg2
    .create('mem://typo', 4096, { openOptions: { sped: '1' } })
    .catch((e: unknown) => e as BlockError);
  assert.is(refused.code, 'EINVAL');
  assert.not.ok(mem.images.has('mem://typo'), 'nothing was created');
});

test("create's answer that the new image reads zeroes reaches the backend the registry returns", async () => {
  const mem = createMemoryDriver();
  const zeroFormat: FormatDriver = { ...identity, name: 'zf', create: async () => ({ zeroInitialized: true }) };
  const dirtyFormat: FormatDriver = { ...identity, name: 'df', create: async () => ({ zeroInitialized: false }) };
  const reg = new DriverRegistry().register(
    {
      ...mem,
      create: async (l, n) => {
        mem.images.set(l, new MemoryBackend({ size: n, location: l, zeroInitialized: false }));
      },
    },
    zeroFormat,
    dirtyFormat,
    identity,
  );
  assert.ok((await reg.create('mem://a', 4096, { format: 'zf' })).zeroInitialized, 'the format says so');
  assert.not.ok((await reg.create('mem://b', 4096, { format: 'df' })).zeroInitialized, 'the format says not');
  assert.not.ok((await reg.create('mem://c', 4096, { format: 'raw' })).zeroInitialized, 'no one says so');
  assert.not.ok((await reg.open('mem://a', { format: 'zf' })).zeroInitialized, 'a later open is not told');
});

test.run();
