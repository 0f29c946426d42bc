import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BLOCK_API_VERSION, ungated, BlockError, DriverRegistry, createMemoryDriver, parseLocation, redactCredentials, redactLocation, resolveRelative, type FormatDriver } from '../src/index.js';

const identity: FormatDriver = {
  apiVersion: BLOCK_API_VERSION, kind: 'format', name: 'raw',
  probe: () => 1, open: async (file) => file, create: async () => {}, protocolSizeFor: (n) => n,
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
  const err = (f: () => unknown): BlockError => { try { f(); } catch (e) { return e as BlockError; } throw new Error('no error'); };
  const nfs = err(() => reg.protocolFor('nfs://h/e/x.raw'));
  assert.is(nfs.code, 'ENODRIVER');
  assert.match(nfs.message, /no driver for scheme "nfs": install @blockconv\/driver-nfs \(needs libnfs \(Debian: libnfs-dev\)\)/);
  assert.match(err(() => reg.protocolFor('iscsi://h/iqn/1')).message, /install @blockconv\/driver-iscsi/);
  assert.match(err(() => reg.format('qcow2')).message, /no driver for format "qcow2": install @blockconv\/driver-qcow2/);
  assert.match(err(() => reg.protocolFor('/tmp/x')).message, /install @blockconv\/driver-raw/);
  assert.match(err(() => reg.protocolFor('weird://x')).message, /no driver for scheme "weird"/);
  reg.register(identity);
  assert.match(err(() => reg.format('vmdk')).message, /unknown format "vmdk" \(known: raw\)/);
});

test('drivers written against another API version are refused', () => {
  assert.throws(() => new DriverRegistry().register({ ...identity, apiVersion: 2 as 1 }), /implements API version 2/);
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
  assert.is(resolveRelative('nfs://h/export/dir/top.qcow2?version=4', 'base.qcow2'), 'nfs://h/export/dir/base.qcow2?version=4');
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

test.run();
