/**
 * CI's slice of the soak (tools/soak.ts; the campaign runs 500): consecutive converts
 * through the library API in this process, over every driver and error cases. No file
 * descriptor, socket or libuv handle may be left behind, and memory must not climb.
 * BLOCKCONV_SOAK_CONVERTS resizes it.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { runSoak } from '../../../tools/soak.js';

const CONVERTS = Number(process.env.BLOCKCONV_SOAK_CONVERTS ?? 65);

test(`soak: ${CONVERTS} converts over every driver and error cases leak nothing`, async () => {
  const r = await runSoak(CONVERTS);
  assert.equal(r.surprises, []);
  assert.ok(r.failedAsExpected > 0);
  assert.ok(r.last.fds <= r.first.fds, `fds ${r.first.fds} -> ${r.last.fds}`);
  assert.ok(r.last.sockets <= r.first.sockets, `sockets ${r.first.sockets} -> ${r.last.sockets}`);
  assert.ok(r.last.handles <= r.first.handles, `libuv handles ${r.first.handles} -> ${r.last.handles}`);
  // Without --expose-gc the heap is sampled as it is: allow for garbage not yet collected.
  assert.ok(r.last.rssMiB - r.first.rssMiB <= 48, `RSS ${r.first.rssMiB} -> ${r.last.rssMiB} MiB`);
});

test.run();
