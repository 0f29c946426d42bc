/** What counts as a succeeded job, without Redis. */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { jobSucceeded, type ConvertJobSummary } from '../src/index.js';

const base: ConvertJobSummary = { id: '1', state: 'completed', sources: ['a'], target: 'b', attemptsMade: 1 };
const result = { total: 1, elapsedMs: 1, bytesRead: 1, bytesWritten: 1, worker: 'w' };

test('completed with a result succeeds; without one, or with a failed tee target, or not completed, it does not', () => {
  assert.is(jobSucceeded({ ...base, result }), true);
  assert.is(jobSucceeded(base), false, 'completed, but no result recorded');
  assert.is(
    jobSucceeded({
      ...base,
      result: {
        ...result,
        targets: [
          { location: 'b', ok: true },
          { location: 'c', ok: false, error: 'EIO' },
        ],
      },
    }),
    false,
  );
  assert.is(jobSucceeded({ ...base, result: { ...result, targets: [{ location: 'b', ok: true }] } }), true);
  assert.is(jobSucceeded({ ...base, state: 'failed', result }), false);
  assert.is(jobSucceeded({ ...base, state: 'active' }), false);
});

test.run();
