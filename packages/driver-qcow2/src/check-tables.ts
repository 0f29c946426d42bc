/**
 * The tables `check` works on: the in-memory refcount table it builds from the
 * references (QEMU's "IMRT"), the refcounts stored in the image, and reads that behave
 * as QEMU's do where a damaged image points them: past the end of the file they read
 * zeroes, and only beyond what a request can address (2^63 - 2^30) do they fail.
 */
import { BlockError, type GatedBackend } from '@blockconv/core';
import { hex } from './errors.js';
import type { ReadMeta } from './io.js';
import { refcountAt, setRefcountAt } from './refcounts.js';
import { REFT_RESERVED_LO, TWO_32 } from './format.js';

/** QEMU's BDRV_MAX_LENGTH: requests reaching past it fail with EIO. */
const MAX_REQUEST_END = 2 ** 63 - 2 ** 30;
/** Refcount table entries: bits 9..63 are the block's offset, bits 0..8 are reserved (qcow2.txt). */

/**
 * Reads [offset, offset+length) with what lies past the end of the file as zeroes,
 * as QEMU's block layer reads; fails (EIO) only for requests past what QEMU can address.
 */
export async function readPadded(
  file: GatedBackend,
  read: ReadMeta,
  offset: number,
  length: number,
): Promise<Uint8Array> {
  if (offset + length > MAX_REQUEST_END) {
    throw new BlockError('EIO', `read of ${length} bytes at ${hex(offset)} is beyond any file`, {
      location: file.location,
      op: 'check',
      offset,
      length,
    });
  }
  const out = new Uint8Array(length);
  const inside = Math.min(length, Math.max(0, file.size - offset));
  if (inside > 0) out.set(await read(offset, inside));
  return out;
}

/** A refcount table entry as QEMU reads it: the offset with the reserved bits masked off. */
export interface ReftableEntry {
  /** Approximate beyond 2^53, which only ever lies far past the end of any file. */
  readonly offset: number;
  readonly reservedBits: boolean;
  /** Told from the low word, which `offset` may round away. */
  readonly aligned: boolean;
}

export function reftableEntry(table: DataView, index: number, clusterSize: number): ReftableEntry {
  const hi = table.getUint32(index * 8);
  const lo = table.getUint32(index * 8 + 4);
  const low = (lo & ~REFT_RESERVED_LO) >>> 0;
  return {
    offset: hi * TWO_32 + low,
    reservedBits: (lo & REFT_RESERVED_LO) !== 0,
    aligned: (low & (clusterSize - 1)) === 0,
  };
}

/**
 * The in-memory refcount table: references counted per host cluster, capped at the
 * largest refcount the image's refcount width holds (a reference past that is an
 * overflow, which QEMU counts as a corruption). Its length starts at the file's
 * clusters and grows as QEMU's does: by references up to one cluster past the end
 * of the file, and by clusters a rebuild allocates.
 */
export class ReferenceCounts {
  #counts: Uint16Array;
  readonly #wide = new Map<number, number>();
  #size: number;

  constructor(
    clusters: number,
    readonly max: number,
  ) {
    this.#size = clusters;
    this.#counts = new Uint16Array(clusters + 1);
  }

  /** Entries in the table: QEMU's nb_clusters. */
  get size(): number {
    return this.#size;
  }

  get(c: number): number {
    return c < this.#size ? (this.#wide.get(c) ?? this.#counts[c]!) : 0;
  }

  /** Counts one more reference to cluster `c`; false when its count is already the maximum. */
  inc(c: number): boolean {
    const v = this.get(c);
    if (v >= this.max) return false;
    this.set(c, v + 1);
    return true;
  }

  set(c: number, v: number): void {
    this.grow(c + 1);
    if (v > 0xffff) {
      this.#wide.set(c, v);
    } else {
      this.#wide.delete(c);
      this.#counts[c] = v;
    }
  }

  /** Makes the table at least `size` entries long (new entries are 0). */
  grow(size: number): void {
    if (size <= this.#size) return;
    if (size > this.#counts.length) {
      const bigger = new Uint16Array(Math.max(size, Math.ceil(this.#counts.length * 1.5)));
      bigger.set(this.#counts);
      this.#counts = bigger;
    }
    this.#size = size;
  }

  /** Zeroes every count; the length stays (QEMU recounts after a rebuild into the same table). */
  clear(): void {
    this.#counts.fill(0);
    this.#wide.clear();
  }
}

/** Why a stored refcount could not be read: QEMU counts each such cluster as a check error. */
export class RefcountUnreadable {
  constructor(readonly reason: string) {}
}

/**
 * The refcounts stored in the image, looked up through a refcount table held in
 * memory (QEMU's qcow2_get_refcount): a cluster past the table, or whose entry is 0,
 * has refcount 0; an unaligned refcount block cannot be read. A few blocks are kept,
 * and blocks that repairs change are written back by flush().
 */
export class StoredRefcounts {
  readonly entries: number;
  readonly #view: DataView;
  readonly #perBlock: number;
  readonly #cache = new Map<number, { bytes: Uint8Array; view: DataView; dirty: boolean }>();

  constructor(
    private readonly file: GatedBackend,
    private readonly read: ReadMeta,
    readonly table: Uint8Array,
    private readonly cs: number,
    private readonly bits: number,
    /** Called at each look-up in an unaligned block (QEMU signals a corruption each time; it is told once). */
    private readonly onUnaligned: (message: string) => Promise<void>,
  ) {
    this.entries = table.length / 8;
    this.#view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    this.#perBlock = (cs * 8) / bits;
  }

  /** Refcount block `r`'s entry (offset 0: none), reserved bits masked off as QEMU does. */
  entry(r: number): ReftableEntry {
    return r < this.entries ? reftableEntry(this.#view, r, this.cs) : { offset: 0, reservedBits: false, aligned: true };
  }

  blockOffset(r: number): number {
    return this.entry(r).offset;
  }

  /** Index of the last entry that names a block (QEMU's max_refcount_table_index). */
  lastUsedEntry(): number {
    let i = this.entries - 1;
    while (i > 0 && this.blockOffset(i) === 0) i--;
    return Math.max(0, i);
  }

  async get(cluster: number): Promise<number | RefcountUnreadable> {
    const block = await this.#block(cluster);
    if (block === undefined || block instanceof RefcountUnreadable) return block ?? 0;
    return refcountAt(block.bytes, block.view, this.bits, cluster % this.#perBlock);
  }

  /** Sets a stored refcount (a repair); false when the cluster has no readable block to hold it. */
  async set(cluster: number, value: number): Promise<boolean> {
    const block = await this.#block(cluster);
    if (block === undefined || block instanceof RefcountUnreadable) return false;
    setRefcountAt(block.bytes, block.view, this.bits, cluster % this.#perBlock, value);
    block.dirty = true;
    return true;
  }

  /** Writes back the blocks repairs changed. */
  async flush(): Promise<void> {
    for (const [offset, block] of this.#cache) {
      if (!block.dirty) continue;
      await this.file.write(offset, block.bytes);
      block.dirty = false;
    }
  }

  async #block(
    cluster: number,
  ): Promise<{ bytes: Uint8Array; view: DataView; dirty: boolean } | RefcountUnreadable | undefined> {
    const r = Math.floor(cluster / this.#perBlock);
    const { offset, aligned } = this.entry(r);
    if (offset === 0) return undefined;
    if (!aligned) {
      await this.onUnaligned(`Refblock offset ${hex(offset)} unaligned (reftable index: ${hex(r)})`);
      return new RefcountUnreadable('Input/output error');
    }
    let block = this.#cache.get(offset);
    if (!block) {
      let bytes: Uint8Array;
      try {
        bytes = await readPadded(this.file, this.read, offset, this.cs);
      } catch {
        return new RefcountUnreadable('Input/output error');
      }
      // Keep a few: the compare walks blocks in order, the copied-flag check jumps about.
      if (this.#cache.size >= 64) await this.#evictOne();
      block = { bytes, view: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength), dirty: false };
      this.#cache.set(offset, block);
    }
    return block;
  }

  async #evictOne(): Promise<void> {
    const [offset, block] = this.#cache.entries().next().value as [number, { bytes: Uint8Array; dirty: boolean }];
    if (block.dirty) await this.file.write(offset, block.bytes);
    this.#cache.delete(offset);
  }
}
