/**
 * qcow2 as the source of a fused copy (copyTo): the host runs of a chunk's data
 * clusters go to a raw file target that reads, scans and writes them in one job.
 * Where the bytes need the driver (compressed clusters, a backing file) it declines
 * and the chunk is read and written as before; qemu-img compare says the result is the
 * same either way.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { convert, forwardBackend, ungated, type BlockBackend, type CopyRequest } from '@blockconv/core';
import { KiB, MiB, create, qemuImg, qemuIo, registry, removeDir, tempDir } from './helpers.js';

let dir = '';
test.before(() => {
  dir = tempDir('blockconv-qcow2-pipe-');
});
test.after(() => removeDir(dir));

/** Converts to a new raw file, counting the zero runs the target's copyFrom found (-1: declined). */
async function pipedConvert(image: string, out: string): Promise<{ results: number[]; bytesWritten: number }> {
  const reg = registry();
  const src = await reg.open(image, { readOnly: true });
  const dst = await reg.create(out, src.size, { format: 'raw' });
  const inner = ungated(dst);
  const results: number[] = [];
  const target = forwardBackend(inner, {
    copyFrom: async (o: number, n: number, s: BlockBackend, r: CopyRequest) => {
      const v = await inner.copyFrom!(o, n, s, r);
      results.push(v ? r.zeroRuns.count : -1);
      return v;
    },
  });
  try {
    const r = await convert({ sources: [src], target, workers: 4, targetIsZero: true });
    return { results, bytesWritten: r.bytesWritten };
  } finally {
    await src.close();
    await dst.close();
  }
}

function identical(image: string, raw: string): void {
  assert.is(qemuImg('compare', '-F', 'raw', image, raw).trim(), 'Images are identical.');
}

test('data clusters in runs, zero clusters, written zeroes and a fragmented host layout are piped', async () => {
  const image = create(path.join(dir, 'plain.qcow2'), '64M', { cluster_size: 65536 });
  // Written out of order, so that guest-contiguous clusters lie apart in the file.
  qemuIo(image, [
    'write -P 0x21 8M 1M',
    'write -P 0x11 0 3M',
    'write -z 1M 256k',
    'write -P 0x31 4M 64k',
    'write -P 0x41 4224k 64k',
    'write -P 0 6M 512k',
    'write -P 0x51 9M 64k',
    'write -P 0x61 8704k 128k',
    'write -P 0x71 63M 1M',
  ]);
  const out = path.join(dir, 'plain.raw');
  const { results, bytesWritten } = await pipedConvert(image, out);
  assert.ok(results.length > 0 && results.every((v) => v >= 0), `every chunk piped (${results.join(' ')})`);
  identical(image, out);
  // The written zeroes (6M, 512 KiB) are found by the scan; the zero clusters were never data.
  assert.is(bytesWritten, 3 * MiB - 256 * KiB + 128 * KiB + MiB + 64 * KiB + MiB);
});

test('compressed clusters and a backing file decline: read and written instead, same result', async () => {
  const raw = path.join(dir, 'for-compress.raw');
  fs.writeFileSync(raw, Buffer.alloc(4 * MiB, 'compressible text '));
  const compressed = path.join(dir, 'compressed.qcow2');
  qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, compressed);
  let out = path.join(dir, 'compressed.raw');
  let r = await pipedConvert(compressed, out);
  assert.ok(
    r.results.every((v) => v === -1),
    'compressed: not piped',
  );
  identical(compressed, out);

  const base = create(path.join(dir, 'base.qcow2'), '8M');
  qemuIo(base, ['write -P 0x0b 0 8M']);
  const top = create(path.join(dir, 'top.qcow2'), '8M', { backing_file: base, backing_fmt: 'qcow2' });
  qemuIo(top, [`write -P 0x0c ${2 * MiB} ${64 * KiB}`]);
  out = path.join(dir, 'top.raw');
  r = await pipedConvert(top, out);
  // The top's own cluster is piped; chunks of the backing file's data are declined by
  // the qcow2 source before they reach the target, and read through the driver.
  assert.equal(r.results, [0], "only the top's own cluster reached the target");
  assert.is(r.bytesWritten, 8 * MiB);
  identical(top, out);
});

test.run();
