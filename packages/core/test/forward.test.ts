import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { MemoryBackend, forwardBackend } from '../src/index.js';
import { pattern } from '../src/testkit/index.js';

test('forwardBackend passes every member through, methods bound, accessors live, overrides win', async () => {
  const inner = new MemoryBackend({ size: 1 << 20 });
  const outer = forwardBackend(inner, { driverName: 'outer', info: async () => ({ layer: 'outer' }) });
  assert.is(outer.driverName, 'outer');
  assert.equal(await outer.info!(), { layer: 'outer' });
  assert.is(outer.canReadHolesCheaply, true, 'a flag the forwarder was never told about');
  assert.type(outer.writeSegments, 'function', 'an optional method the forwarder was never told about');
  await outer.write(0, pattern(65536, 1)); // private state of the inner backend is reachable
  assert.is((outer as unknown as MemoryBackend).allocatedBytes, 65536, 'accessors read the inner backend now');
  assert.ok(Buffer.from(await inner.read(0, 65536)).equals(Buffer.from(pattern(65536, 1))));
});

test.run();
