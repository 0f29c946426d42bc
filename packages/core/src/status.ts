/**
 * Block status of a whole backing chain (QEMU's bdrv_block_status_above): what a
 * reader of the top image sees, data or zeroes, at an offset.
 */
import { BlockError } from './errors.js';
import { gateBackend } from './gate.js';
import type { BlockBackend, Extent, GatedBackend } from './types.js';

/**
 * The first extent at `offset` as the top image reads it: 'data' when some layer
 * holds data, 'zero' when the first layer that answers says zero, or when no layer
 * allocates the range (reads through to nothing). Never 'unallocated'. The length is
 * capped by every layer consulted, at least 1 and at most `length`.
 */
export async function chainStatus(top: BlockBackend, offset: number, length: number): Promise<Extent> {
  let len = Math.min(length, top.size - offset);
  for (let layer: GatedBackend | undefined = gateBackend(top); layer; layer = layer.backing) {
    if (offset >= layer.size) return { kind: 'zero', length: len }; // past a shorter backing file
    const ext = await layer.blockStatus(offset, Math.min(len, layer.size - offset));
    if (!(ext.length > 0)) {
      throw new BlockError('EIO', `driver returned an empty extent`, {
        op: 'blockStatus',
        location: layer.location,
        offset,
      });
    }
    len = Math.min(len, ext.length);
    if (ext.kind !== 'unallocated') return { kind: ext.kind, length: len };
  }
  return { kind: 'zero', length: len };
}
