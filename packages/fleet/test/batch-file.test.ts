/** Batch files and server names, without Redis: what parseBatch makes of them, and its errors. */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { parseBatch, serverOf } from '../src/index.js';

test('targets with equal options share jobs up to targetsPerJob; per-target options split them', () => {
  const b = parseBatch({
    source: 'nfs://filer/t.qcow2',
    sourceFormat: 'qcow2',
    options: { targetFormat: 'raw' },
    targetsPerJob: 2,
    targets: [
      'nfs://filer/a',
      'nfs://filer/b',
      'nfs://filer/c',
      { target: 'iscsi://portal/iqn.x:y/1', noCreate: true, outOfOrder: true },
    ],
    caps: { 'nfs://filer': 2, '*': 8 },
    attempts: 5,
  });
  assert.equal(b.jobs, [
    {
      targetFormat: 'raw',
      sources: ['nfs://filer/t.qcow2'],
      sourceFormat: 'qcow2',
      target: 'nfs://filer/a',
      tee: ['nfs://filer/b'],
    },
    { targetFormat: 'raw', sources: ['nfs://filer/t.qcow2'], sourceFormat: 'qcow2', target: 'nfs://filer/c' },
    {
      targetFormat: 'raw',
      noCreate: true,
      outOfOrder: true,
      sources: ['nfs://filer/t.qcow2'],
      sourceFormat: 'qcow2',
      target: 'iscsi://portal/iqn.x:y/1',
    },
  ]);
  assert.equal(b.caps, { 'nfs://filer': 2, '*': 8 });
  assert.is(b.attempts, 5);
});

test('bad batches: one line naming the field', () => {
  const cases: Array<[unknown, RegExp]> = [
    [[], /batch: \(top\): a batch is a JSON object/],
    [{ targets: ['a'] }, /batch: source: give "source" or "sources"/],
    [{ source: 'a', targets: [] }, /batch: targets: expected a non-empty list/],
    [{ source: 'a', targets: ['b', 'b'] }, /batch: targets\[1\]: b is named twice/],
    [
      { source: 'a', targets: [{ target: 'b', workers: 'many' }] },
      /batch: targets\[0\]\.workers: expected a whole number, got "many"/,
    ],
    [{ source: 'a', targets: [{ target: 'b', colour: 'red' }] }, /batch: targets\[0\]\.colour: unknown option/],
    [{ source: 'a', targets: ['b'], caps: { filer: 2 } }, /batch: caps\.filer: .*name a server as nfs:\/\/HOST/],
    [{ source: 'a', targets: ['b'], caps: { 'nfs://filer': 0 } }, /batch: caps\.nfs:\/\/filer: .*at least 1/],
    [{ source: 'a', targets: ['b'], targetsPerJob: 0 }, /batch: targetsPerJob: expected a whole number of at least 1/],
    [{ source: 'a', targets: ['b'], extra: 1 }, /batch: extra: unknown field/],
  ];
  for (const [input, re] of cases) assert.throws(() => parseBatch(input), re, JSON.stringify(input));
});

test('servers as caps name them', () => {
  assert.is(serverOf('nfs://Filer/export/a.raw'), 'nfs://filer');
  assert.is(serverOf('iscsi://user@10.0.0.5/iqn.x:y/1'), 'iscsi://10.0.0.5:3260');
  assert.is(serverOf('iscsi://[fe80::1]:3261/iqn.x:y/1'), 'iscsi://[fe80::1]:3261');
  assert.is(serverOf('/var/lib/images/a.raw'), undefined);
  assert.is(serverOf('nbd://host:10809/x'), 'nbd://host:10809');
});

test.run();
