/**
 * CI's slice of the command-line fuzzing (tools/fuzz/cli-args.ts; the campaign runs
 * thousands): random and malformed command lines and environments for the real command.
 * Each must end with a documented exit code and, failing, one error line: never a stack
 * trace. BLOCKCONV_ARGFUZZ_CASES and BLOCKCONV_ARGFUZZ_SEED resize and reseed it.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { runArgFuzz } from '../../../tools/fuzz/cli-args.js';

const CASES = Number(process.env.BLOCKCONV_ARGFUZZ_CASES ?? 60);
const SEED = Number(process.env.BLOCKCONV_ARGFUZZ_SEED ?? 15);

test(`${CASES} random command lines (seed ${SEED}): a documented exit, one error line, no stack trace`, async () => {
  const r = await runArgFuzz({ cases: CASES, seed: SEED });
  assert.equal(
    r.problems.map((p) => `case ${p.index} ${JSON.stringify(p.argv).slice(0, 300)}: ${p.problem}`),
    [],
  );
  assert.ok((r.byCode['1'] ?? 0) > CASES / 2, `most lines are refused: ${JSON.stringify(r.byCode)}`);
});

test.run();
