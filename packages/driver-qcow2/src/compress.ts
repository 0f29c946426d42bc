/**
 * Compressing clusters for writing (convert -c), in QEMU's formats: zlib as raw
 * deflate with a 4 KiB window (QEMU's reader expects no larger), zstd as one frame.
 * The native @blockconv/codec does whole batches on the thread pool; without it,
 * zlib falls back to node:zlib (also on the thread pool, one call per cluster) and
 * zstd is refused. A cluster is stored compressed only when that saves space.
 */
import { promisify } from 'node:util';
import { constants as zc, deflateRaw } from 'node:zlib';
import { BlockError } from '@blockconv/core';
import { nativeCodec } from './compression.js';
import { COMPRESSION_ZLIB } from './header.js';

const deflate = promisify(deflateRaw);

/** compressClusters' length for a cluster that does not shrink. */
export const STORE_UNCOMPRESSED = -1;

/**
 * Compresses `count` whole clusters of `input` into slots of `clusterSize - 1` bytes
 * of `output`; `lengths[i]` gets cluster i's compressed size or STORE_UNCOMPRESSED.
 */
export async function compressClusters(
  type: number,
  clusterSize: number,
  input: Uint8Array,
  count: number,
  output: Uint8Array,
  lengths: Int32Array,
): Promise<void> {
  const native = await nativeCodec();
  const kind = type === COMPRESSION_ZLIB ? 'zlib' : 'zstd';
  if (native) {
    const spans = new Float64Array(count * 2);
    for (let i = 0; i < count; i++) {
      spans[2 * i] = i * clusterSize;
      spans[2 * i + 1] = i * (clusterSize - 1);
    }
    await native.compressBatch({ kind, clusterSize, input, spans, count, output, lengths });
    return;
  }
  if (kind !== 'zlib') {
    throw new BlockError(
      'ENOTSUP',
      'writing zstd-compressed clusters needs @blockconv/codec (libzstd-dev at install time)',
      { op: 'write' },
    );
  }
  await Promise.all(
    Array.from({ length: count }, async (_, i) => {
      const out = await deflate(input.subarray(i * clusterSize, (i + 1) * clusterSize), {
        level: zc.Z_DEFAULT_COMPRESSION,
        windowBits: 12,
        memLevel: 9,
      });
      if (out.length >= clusterSize) {
        lengths[i] = STORE_UNCOMPRESSED;
        return;
      }
      output.set(out, i * (clusterSize - 1));
      lengths[i] = out.length;
    }),
  );
}
