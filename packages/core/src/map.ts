/**
 * The allocation map of an image through its backing chain, in the shape of
 * `qemu-img map --output=json`: adjacent ranges with the same status are merged.
 */
import { toBlockError } from './errors.js';
import { gateBackend } from './gate.js';
import type { BlockBackend, Extent, GatedBackend } from './types.js';

export interface MapEntry {
  start: number;
  length: number;
  /** Index in the backing chain of the layer that answers (0 = the image itself). */
  depth: number;
  /** Some layer allocates the range. */
  present: boolean;
  zero: boolean;
  data: boolean;
  /** Offset of the data in the answering layer's storage, when the driver knows it. */
  offset?: number;
}

export async function* mapImage(image: BlockBackend, start = 0, length = image.size - start): AsyncGenerator<MapEntry> {
  const end = Math.min(image.size, start + length);
  const gated = gateBackend(image);
  let pending: MapEntry | undefined;
  for (let pos = start; pos < end; ) {
    const entry = await statusAt(gated, pos, end - pos);
    pos += entry.length;
    if (pending && mergeable(pending, entry)) {
      pending.length += entry.length;
      continue;
    }
    if (pending) yield pending;
    pending = entry;
  }
  if (pending) yield pending;
}

function mergeable(a: MapEntry, b: MapEntry): boolean {
  return (
    a.depth === b.depth &&
    a.present === b.present &&
    a.zero === b.zero &&
    a.data === b.data &&
    (a.offset === undefined) === (b.offset === undefined) &&
    (a.offset === undefined || a.offset + a.length === b.offset)
  );
}

async function statusAt(image: GatedBackend, pos: number, length: number): Promise<MapEntry> {
  let len = length;
  // As qemu-img map: a range no layer allocates is reported at the last layer asked
  // (the overlay, when a shorter backing file ends before it), with that layer's offset.
  let lastDepth = 0;
  let lastOffset: number | undefined;
  let depth = 0;
  for (let layer: GatedBackend | undefined = image; layer; layer = layer.backing, depth++) {
    if (pos >= layer.size) break;
    let ext: Extent;
    try {
      ext = layer.canBlockStatus
        ? await layer.blockStatus(pos, Math.min(len, layer.size - pos))
        : { kind: 'data' as const, length: layer.size - pos };
    } catch (err) {
      throw toBlockError(err, { op: 'blockStatus', location: layer.location, offset: pos });
    }
    len = Math.max(1, Math.min(len, ext.length));
    lastDepth = depth;
    lastOffset = ext.offset;
    if (ext.kind !== 'unallocated') {
      const entry: MapEntry = {
        start: pos,
        length: len,
        depth,
        present: true,
        zero: ext.kind === 'zero',
        data: ext.kind === 'data',
      };
      if (ext.offset !== undefined) entry.offset = ext.offset;
      return entry;
    }
  }
  const entry: MapEntry = { start: pos, length: len, depth: lastDepth, present: false, zero: true, data: false };
  if (lastOffset !== undefined) entry.offset = lastOffset;
  return entry;
}
