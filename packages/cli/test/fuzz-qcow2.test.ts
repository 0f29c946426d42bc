/**
 * CI's slice of the qcow2 fuzz campaign (tools/fuzz/qcow2-fuzz.ts; the full campaign is
 * tools/fuzz-qcow2.sh): structure-aware mutants of valid images made by qemu-img, each
 * run through info, map, check, convert and checksum under the time and memory bounds,
 * compared with qemu-img convert, and every 30th through the blockconv command too.
 * Any crash, hang, overrun, exception other than a one-line BlockError, fd leak or
 * differential mismatch fails the test with the case's seed and mutations, so that
 * `tsx tools/fuzz/qcow2-fuzz.ts --seed S --case I` replays it.
 *
 * BLOCKCONV_FUZZ_CASES (default 300) and BLOCKCONV_FUZZ_SEED (default 15) resize it.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { runCampaign, summarize } from '../../../tools/fuzz/qcow2-fuzz.js';

const CASES = Number(process.env.BLOCKCONV_FUZZ_CASES ?? 300);
const SEED = Number(process.env.BLOCKCONV_FUZZ_SEED ?? 15);

test(`qcow2 fuzz: ${CASES} mutants (seed ${SEED}) end in qemu-img's bytes or a one-line refusal, in bounds`, async () => {
  const r = await runCampaign({ cases: CASES, seed: SEED, cliEvery: 30 });
  if (process.env.BLOCKCONV_FUZZ_REPORT) console.log(summarize(r));
  const defects = r.defects.map(
    (d) =>
      `case ${d.index} (${d.base}; ${d.changes.join('; ')}): ${d.defects.map((x) => `${x.kind}${x.op ? ` in ${x.op}` : ''}: ${x.detail.slice(0, 600)}`).join('; ')}`,
  );
  assert.is(defects.length, 0, `defects (seed ${SEED}):\n${defects.join('\n')}`);
  assert.is(r.crashes + r.hangs + r.overMemory + r.mismatches + r.otherDefects, 0);
  // The slice means something only if most mutants are still read, and some refused.
  assert.ok(r.equal > CASES / 3, `equal to qemu-img in ${r.equal} of ${CASES}`);
  assert.ok(r.refused + r.bothRefused > 0, 'some mutants refused');
  assert.ok(r.cliRuns >= Math.floor(CASES / 30), `the command ran on ${r.cliRuns} cases`);
});

test.run();
