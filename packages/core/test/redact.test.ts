import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  BLOCK_API_VERSION,
  BlockError,
  DriverRegistry,
  REDACTED,
  createMemoryDriver,
  isSecretParameter,
  redactCredentials,
  redactLocation,
  registerSecret,
  toBlockError,
  type ProtocolDriver,
} from '../src/index.js';

test('the password of a URL user part goes, for any scheme and either separator; the user stays', () => {
  assert.is(redactLocation('iscsi://bob%Pw-one1@host/iqn.x/1'), 'iscsi://bob@host/iqn.x/1');
  assert.is(redactLocation('nfs://u:Pw-two22@host/export/f'), 'nfs://u@host/export/f');
  assert.is(
    redactLocation('s3+https://key:Pw-three3@bucket.example:9000/a/b'),
    's3+https://key@bucket.example:9000/a/b',
  );
  assert.is(redactLocation('ISCSI://bob%Pw-four44@[::1]:3261/iqn.x/1'), 'ISCSI://bob@[::1]:3261/iqn.x/1');
  // An '@' or a quote in the password: a location's user part ends at its last '@'.
  assert.is(redactLocation('iscsi://bob%p@ss"w@host/iqn.x/1'), 'iscsi://bob@host/iqn.x/1');
  // Percent-encoded characters inside the user part: everything after a separator goes.
  assert.is(redactLocation('nfs://bob%40corp:p%3Ass@host/e/f'), 'nfs://bob@host/e/f');
  assert.is(redactLocation('nfs://user@host/e/f'), 'nfs://user@host/e/f', 'a user without a password stays');
});

test('in free text: every URL between spaces, quotes or brackets, the rest untouched', () => {
  assert.is(redactCredentials('{"a":"nfs://u:Pw-json1@h/x","b":"y@z:w"}'), '{"a":"nfs://u@h/x","b":"y@z:w"}');
  assert.is(
    redactCredentials("copy 'iscsi://a%Pw-txt1@h/t/1' to <nfs://c:Pw-txt2@h/e>\n"),
    "copy 'iscsi://a@h/t/1' to <nfs://c@h/e>\n",
  );
  assert.is(redactCredentials('iscsi://a%b@h/t/1'), 'iscsi://a@h/t/1', 'at the very start and end');
  assert.is(redactCredentials('x\tnfs://h/e?token=abc\ty'), `x\tnfs://h/e?token=${REDACTED}\ty`);
});

test('a URL written percent-encoded (inside another) loses its password as well', () => {
  assert.is(
    redactCredentials('nfs://h/e/top.qcow2?backing=iscsi%3A%2F%2Fbob%25Pw-enc1%40h%2Fiqn%2F1'),
    'nfs://h/e/top.qcow2?backing=iscsi%3A%2F%2Fbob%40h%2Fiqn%2F1',
  );
  assert.is(redactCredentials('x=nfs%3a%2f%2fu%3aPw-enc2%40h%2fe'), 'x=nfs%3a%2f%2fu%40h%2fe');
  assert.is(
    redactCredentials('nfs://h/e?u=iscsi://bob%Pw-nest1@h/t/1'),
    'nfs://h/e?u=iscsi://bob@h/t/1',
    'a plain URL nested in a parameter',
  );
});

test('secret query parameters: generic names by default, declared names once a driver is registered', () => {
  assert.is(
    redactLocation('nfs://h/e/f?version=4&password=Pw-q1&uid=0'),
    `nfs://h/e/f?version=4&password=${REDACTED}&uid=0`,
  );
  assert.is(
    redactLocation('x://h/f?Access_Token=abc;api_secret=def#frag'),
    `x://h/f?Access_Token=${REDACTED};api_secret=${REDACTED}#frag`,
  );
  assert.is(redactLocation('x://h/f?pass%77ord=Pw-q2'), `x://h/f?pass%77ord=${REDACTED}`, 'an encoded name');
  assert.is(
    redactCredentials('y=x%3A%2F%2Fh%2Ff%3Fa%3D1%26token%3DPw-q3'),
    `y=x%3A%2F%2Fh%2Ff%3Fa%3D1%26token%3D${REDACTED}`,
  );
  assert.not.ok(isSecretParameter('chapkey'));
  assert.is(redactLocation('zz://h/f?chapkey=Pw-q4'), 'zz://h/f?chapkey=Pw-q4');
  const zz: ProtocolDriver = {
    apiVersion: BLOCK_API_VERSION,
    kind: 'protocol',
    name: 'zz',
    schemes: ['zz'],
    secretParameters: ['ChapKey'],
    open: async () => {
      throw new Error('unused');
    },
  };
  new DriverRegistry().register(zz);
  assert.ok(isSecretParameter('CHAPKEY'));
  assert.is(redactLocation('zz://h/f?chapkey=Pw-q5'), `zz://h/f?chapkey=${REDACTED}`);
  assert.is(
    redactLocation('other://h/f?chapkey=Pw-q6'),
    `other://h/f?chapkey=${REDACTED}`,
    'a secret is a secret in every scheme',
  );
});

test('no false positives: plain paths, URLs without credentials, ordinary text', () => {
  for (const s of [
    '/plain/path@odd',
    '/a/b:c@d.raw',
    'disk.raw?password=x',
    'C:\\images\\a@b.raw',
    'user:name@host is not a URL',
    'nfs://host/export/file@2',
    'nfs://host:2049/export/a@b',
    'nfs://h/e/f?version=4&uid=1000',
    'iscsi://[::1]:3260/iqn.x:y/1',
    'file:///tmp/a%20b.raw',
    'Content mismatch at offset 12345678!',
    'read 64 MiB, wrote 1.5 GiB',
  ]) {
    assert.is(redactCredentials(s), s);
    assert.is(redactLocation(s), s);
  }
});

test('a secret once seen is masked wherever else it appears, long ones only', () => {
  redactLocation('nfs://bob:Marker-seen-1@127.0.0.1/e/f');
  assert.is(
    redactCredentials('Invalid address:bob:Marker-seen-1@127.0.0.1.'),
    `Invalid address:bob:${REDACTED}@127.0.0.1.`,
  );
  redactLocation('nfs://h/e?token=Tok%2Fen-22');
  assert.is(redactCredentials('got Tok/en-22 and Tok%2Fen-22'), `got ${REDACTED} and ${REDACTED}`, 'raw and decoded');
  registerSecret('chap-from-env');
  assert.is(redactCredentials('login as x with chap-from-env'), `login as x with ${REDACTED}`);
  redactLocation('iscsi://bob%abc@h/t/1');
  assert.is(redactCredentials('abc 0xabc'), 'abc 0xabc', 'too short to scan for');
  registerSecret('Marker-seen-1-longer');
  assert.is(redactCredentials('Marker-seen-1-longer'), REDACTED, 'the longest first: nothing of it is left');
});

test('BlockError: location, message and the causes it wraps come out redacted', () => {
  const native = new Error('nfs_mount_async failed. Invalid address:bob:Marker-err-1@127.0.0.1:1. Can not resolv');
  const e = new BlockError('EIO', native.message, {
    location: 'nfs://bob:Marker-err-1@127.0.0.1:1/e/f?secret=Marker-err-2',
    op: 'open',
    cause: native,
  });
  assert.is(e.location, `nfs://bob@127.0.0.1:1/e/f?secret=${REDACTED}`);
  for (const text of [e.message, e.stack!, native.message, native.stack!]) {
    assert.not.match(text, /Marker-err/, text);
  }
  const sys = Object.assign(new Error("ENOENT: no such file, open 'x://u:Marker-err-3@h/f'"), { code: 'ENOENT' });
  const wrapped = toBlockError(new Error('outer', { cause: sys }), { location: 'x://u:Marker-err-3@h/f' });
  assert.not.match(wrapped.message + sys.message + String(sys.stack), /Marker-err-3/);
  assert.not.match(new BlockError('EINVAL', 'malformed file URL "file://u:Marker-err-4@h/x"').message, /Marker-err-4/);
});

test('the registry: backends, open errors and check messages never carry a credential', async () => {
  const images = createMemoryDriver();
  const leaky: ProtocolDriver = {
    ...images,
    name: 'leaky',
    schemes: ['leaky'],
    // A careless driver: its backend keeps the location as given.
    open: async (location) =>
      Object.assign(await images.create!('m', 4096, {}).then(() => images.open('m', {})), { location }),
  };
  const reg = new DriverRegistry().register(leaky);
  const b = await reg.openProtocol('leaky://u:Marker-reg-1@h/x?token=Marker-reg-2');
  assert.is(b.location, `leaky://u@h/x?token=${REDACTED}`);
  const failing: ProtocolDriver = {
    ...leaky,
    name: 'failing',
    schemes: ['failing'],
    open: async (location) => {
      throw new Error(`cannot reach ${location} (server said: bad password Marker-reg-3)`);
    },
  };
  reg.register(failing);
  const err = (await reg.openProtocol('failing://u:Marker-reg-3@h/x').catch((e: unknown) => e)) as BlockError;
  assert.instance(err, BlockError);
  assert.not.match(`${err.message}\n${err.stack}\n${String((err.cause as Error).stack)}`, /Marker-reg/);
  reg.register({
    apiVersion: BLOCK_API_VERSION,
    kind: 'format',
    name: 'talky',
    open: async (file) => file,
    check: async (file) => ({
      corruptions: 0,
      leaks: 0,
      checkErrors: 1,
      corruptionsFixed: 0,
      leaksFixed: 0,
      messages: [`cannot read the backing file leaky://u:Marker-reg-4@h/b of ${file.location}`],
    }),
  });
  const r = await reg.check('leaky://u:Marker-reg-4@h/x', { format: 'talky' });
  assert.equal(r.messages, ['cannot read the backing file leaky://u@h/b of leaky://u@h/x']);
});

test.run();
