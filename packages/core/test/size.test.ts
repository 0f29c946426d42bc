import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { formatSize, parseSize } from '../src/index.js';

test('parseSize takes qemu-img suffixes and refuses junk', () => {
  assert.is(parseSize('4096'), 4096);
  assert.is(parseSize('4k'), 4096);
  assert.is(parseSize('2M'), 2 << 20);
  assert.is(parseSize('1.5G'), 1.5 * 2 ** 30);
  assert.is(parseSize('1T'), 2 ** 40);
  assert.is(parseSize('64KiB'), 65536);
  assert.throws(() => parseSize('4q'), /invalid size "4q"/);
  assert.throws(() => parseSize('-1'), /invalid size/);
  assert.throws(() => parseSize('0.3'), /not a whole number/);
});

test('formatSize keeps significant zeroes', () => {
  assert.is(formatSize(0), '0 B');
  assert.is(formatSize(480 * 2 ** 20), '480 MiB');
  assert.is(formatSize(100 * 2 ** 20), '100 MiB');
  assert.is(formatSize(10 * 2 ** 30), '10 GiB');
  assert.is(formatSize(1.5 * 2 ** 30), '1.5 GiB');
  assert.is(formatSize(2 ** 30), '1 GiB');
  assert.is(formatSize(1.25 * 2 ** 20), '1.25 MiB');
});

test.run();
