// nbd:// and nbd+unix:// URLs as doc/uri.md of NetworkBlockDevice/nbd defines them.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { parseNbdUrl } from '../src/index.js';

test('nbd://host, port and export as the URI standard says', () => {
  assert.equal(parseNbdUrl('nbd://example.com'), {
    endpoint: { host: 'example.com', port: 10809 },
    exportName: '',
    connections: undefined,
  });
  assert.equal(parseNbdUrl('nbd://example.com:1234/disk').endpoint, { host: 'example.com', port: 1234 });
  assert.is(parseNbdUrl('nbd://example.com/disk').exportName, 'disk');
  assert.is(parseNbdUrl('nbd://example.com/').exportName, '');
  assert.is(parseNbdUrl('nbd://example.com//disk').exportName, '/disk');
  assert.is(parseNbdUrl('nbd://example.com/hello%20world').exportName, 'hello world');
  assert.equal(parseNbdUrl('nbd://[::1]:10810/x').endpoint, { host: '::1', port: 10810 });
  assert.is(parseNbdUrl('NBD://h/x?connections=4').connections, 4);
});

test('nbd+unix:///export?socket=PATH', () => {
  assert.equal(parseNbdUrl('nbd+unix:///disk?socket=/run/nbd.sock'), {
    endpoint: { path: '/run/nbd.sock' },
    exportName: 'disk',
    connections: undefined,
  });
  assert.equal(parseNbdUrl('nbd+unix://?socket=/tmp/a%20b.sock').endpoint, { path: '/tmp/a b.sock' });
});

function refused(url: string, code: string, re: RegExp): void {
  try {
    parseNbdUrl(url);
  } catch (err) {
    const e = err as Error & { code: string };
    assert.is(e.code, code, `${url}: ${e.message}`);
    assert.match(e.message, re);
    return;
  }
  assert.unreachable(`${url} was accepted`);
}

test('malformed URLs name what is wrong', () => {
  refused('nbd+unix:///disk', 'EINVAL', /needs \?socket=PATH/);
  refused('nbd+unix://host/disk?socket=/s', 'EINVAL', /takes no host/);
  refused('nbd:///disk', 'EINVAL', /needs a host/);
  refused('nbd://host:99999/', 'EINVAL', /port 99999/);
  refused('nbd://host:0/', 'EINVAL', /port 0/);
  refused('nbd://host/x?foo=1', 'EINVAL', /unknown URL parameter "foo"/);
  refused('nbd://host/x?socket=/s', 'EINVAL', /unknown URL parameter "socket"/);
  refused('nbd://host/x?connections=0', 'EINVAL', /connections=0/);
  refused('nbd://host/x?connections=2&connections=3', 'EINVAL', /twice/);
  refused('nbd://host/%zz', 'EINVAL', /percent-encoding/);
  refused('nbd://host/a%00b', 'EINVAL', /NUL/);
  refused('nbd://host/x#frag', 'EINVAL', /fragment/);
  refused('nbd://user@host/x', 'EINVAL', /user name/);
  refused('nbds://host/x', 'ENOTSUP', /TLS/);
  refused('nbds+unix:///x?socket=/s', 'ENOTSUP', /TLS/);
  refused('nbd://host/x?tls-type=anon', 'ENOTSUP', /TLS/);
});

test.run();
