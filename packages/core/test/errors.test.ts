import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BlockError } from '../src/index.js';

test('an error is one line whatever the names in it hold (a backing file name with a newline: found by the fuzz campaign)', () => {
  const e = new BlockError('ENOENT', 'cannot open backing file "a\nb\tc\x1b[31m" (/x/a\nb)', {
    op: 'open',
    location: '/x/img\n.qcow2',
    field: 'backing_file',
  });
  assert.not.match(e.message, /[\x00-\x1f\x7f]/);
  assert.is(
    e.message,
    '/x/img\\n.qcow2 open field backing_file: cannot open backing file "a\\nb\\tc\\x1b[31m" (/x/a\\nb)',
  );
});

test.run();
