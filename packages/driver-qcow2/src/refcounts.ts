/**
 * Host cluster management (qcow2.txt "Host cluster management"): the refcount table,
 * the refcount blocks, and the allocator a writer takes clusters from.
 *
 * Allocation appends: a run of clusters is reserved at the end of the file, so every
 * run is contiguous, and its refcounts are then set. A refcount block that does not
 * exist yet is placed at the end too (after the run), and a refcount table that is
 * full moves to a bigger copy, as QEMU does. Freed clusters are not reused within a
 * session: convert writes an image front to back, and a later session may reuse them.
 *
 * Nothing here writes to the file by itself. A commit takes copies of what changed
 * (capture) and the writer puts them on disk in the order crash safety needs:
 * refcount blocks, then the table, then the header fields that point to a moved
 * table; frees are applied only after the tables that dropped the references are on
 * disk (applyFrees), so a crash can leak clusters but never leave one referenced
 * with a refcount of 0.
 */
import { BlockError, type GatedBackend } from '@blockconv/core';
import type { TableCache, CachedTable, TableCopy } from './cache.js';
import { corrupt, hex, type Where } from './errors.js';
import { MAX_REFTABLE_BYTES } from './header.js';
import { TWO_32 } from './format.js';

/** The file grows in steps (ftruncate is a metadata write); the tail is cut at close. */
const MIN_GROWTH = 64 * 1024 * 1024;

export interface RefcountParams {
  readonly file: GatedBackend;
  readonly clusterSize: number;
  readonly refcountOrder: number;
  /** The refcount table as stored (big-endian u64 entries, whole clusters). */
  readonly table: Uint8Array;
  readonly tableOffset: number;
  /** Cache of refcount blocks (dirty blocks are kept until a commit takes them). */
  readonly cache: TableCache;
  /** First byte after the last cluster in use: where allocation starts. */
  readonly end: number;
  readonly where: Where;
}

/** What a commit writes for the refcounts, in this order. */
export interface RefcountCommit {
  readonly blocks: TableCopy[];
  /** The table, whole, when it changed. */
  readonly table?: TableCopy;
  /** The table moved: the header must point to it once it is written. */
  readonly moved?: { readonly offset: number; readonly clusters: number };
  /** Clusters that become free once this commit (and the header change) are on disk. */
  readonly freeAfter: Array<readonly [number, number]>;
}

export class Refcounts {
  readonly #file: GatedBackend;
  readonly #cs: number;
  readonly #bits: number;
  readonly #perBlock: number;
  readonly #maxRefcount: number;
  readonly #cache: TableCache;
  readonly #where: Where;
  #table: Uint8Array;
  #tableView: DataView;
  #tableOffset: number;
  #tableDirty = false;
  #moved = false;
  /** Old tables, freed once the header no longer points to them. */
  #oldTables: Array<readonly [number, number]> = [];
  #next: number;
  /** Serialises allocations and frees (both may wait for a block to load). */
  #lock: Promise<unknown> = Promise.resolve();

  constructor(p: RefcountParams) {
    this.#file = p.file;
    this.#cs = p.clusterSize;
    this.#bits = 2 ** p.refcountOrder;
    this.#perBlock = (p.clusterSize * 8) / this.#bits;
    this.#maxRefcount = this.#bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.#bits - 1;
    this.#cache = p.cache;
    this.#where = p.where;
    this.#table = p.table;
    this.#tableView = new DataView(p.table.buffer, p.table.byteOffset, p.table.byteLength);
    this.#tableOffset = p.tableOffset;
    this.#next = Math.ceil(p.end / p.clusterSize) * p.clusterSize;
  }

  /** First byte after the last allocated cluster. */
  get end(): number {
    return this.#next;
  }
  get tableOffset(): number {
    return this.#tableOffset;
  }
  get tableClusters(): number {
    return this.#table.length / this.#cs;
  }
  get dirty(): boolean {
    return this.#tableDirty || this.#cache.dirtyCount > 0 || this.#oldTables.length > 0;
  }
  /** Dirty refcount blocks held in memory (a commit is due when many are). */
  get dirtyBlocks(): number {
    return this.#cache.dirtyCount;
  }

  /** Largest refcount an entry holds (2^refcount_bits - 1). */
  get maxRefcount(): number {
    return this.#maxRefcount;
  }

  /**
   * Reserves `count` contiguous clusters at the end of the file, each with refcount 1;
   * resolves with the first's offset. Clusters past the end that already have a
   * refcount (leaked by an earlier crash) are stepped over, not reused.
   */
  allocate(count: number): Promise<number> {
    return this.#serial(async () => {
      for (;;) {
        const host = this.#next;
        const used = await this.#lastInUse(host, count);
        if (used >= 0) {
          this.#next = used + this.#cs;
          continue;
        }
        this.#next += count * this.#cs;
        await this.#grow();
        await this.#increment(host, count);
        return host;
      }
    });
  }

  /** Counts `count` clusters from `host`, below the end, as in use (a new image's header and table). */
  markUsed(host: number, count: number): Promise<void> {
    return this.#serial(() => this.#increment(host, count));
  }

  /** One more reference to the cluster at `host` (compressed data sharing it). */
  addReference(host: number): Promise<void> {
    return this.#serial(() => this.#add(Math.floor(host / this.#cs), 1));
  }

  /** The refcount of the cluster at `host` (0 past the table or in a missing block). */
  async get(host: number): Promise<number> {
    const cluster = Math.floor(host / this.#cs);
    const blockOffset = this.#blockOffset(Math.floor(cluster / this.#perBlock));
    if (blockOffset === 0) return 0;
    const block = await this.#cache.get(blockOffset);
    return this.#read(block, cluster % this.#perBlock);
  }

  /**
   * Runs `fn` while no allocation or free is half done, so that a commit can take its
   * copies (of L2 tables and of refcounts) at one consistent instant.
   */
  exclusive<T>(fn: () => T): Promise<T> {
    return this.#serial(async () => fn());
  }

  /** Takes copies of everything changed since the last capture (see RefcountCommit); see exclusive(). */
  capture(): RefcountCommit {
    const blocks = this.#cache.takeDirty();
    const table = this.#tableDirty ? { offset: this.#tableOffset, bytes: this.#table.slice() } : undefined;
    const moved = this.#moved ? { offset: this.#tableOffset, clusters: this.tableClusters } : undefined;
    const freeAfter = this.#oldTables;
    this.#tableDirty = false;
    this.#moved = false;
    this.#oldTables = [];
    return { blocks, table, moved, freeAfter };
  }

  /** The blocks of a capture are on disk: the cache may evict them again. */
  committed(c: RefcountCommit): void {
    this.#cache.written(c.blocks);
  }

  /** Old tables of a capture whose frees did not happen: the next commit frees them. */
  requeueOldTables(c: RefcountCommit): void {
    this.#oldTables.push(...c.freeAfter);
  }

  /** Undoes capture() after a failed commit, so that the next one writes everything again. */
  restore(c: RefcountCommit): void {
    this.#cache.written(c.blocks, true);
    if (c.table) this.#tableDirty = true;
    if (c.moved) this.#moved = true;
    this.#oldTables.push(...c.freeAfter);
  }

  /**
   * Decrements the refcount of every cluster each [offset, length) range touches
   * (compressed data may share clusters, as in QEMU): to be called only once no
   * table on disk refers to them any more.
   */
  applyFrees(ranges: Array<readonly [number, number]>): Promise<void> {
    if (ranges.length === 0) return Promise.resolve();
    return this.#serial(async () => {
      // Each range leaves the list once applied: after a failure, the caller retries only the rest.
      while (ranges.length) {
        const [offset, length] = ranges[0]!;
        const first = Math.floor(offset / this.#cs);
        const last = Math.floor((offset + length - 1) / this.#cs);
        // Load every block first, so that a range is applied whole or not at all.
        for (let c = first; c <= last; c++) await this.#block(Math.floor(c / this.#perBlock));
        for (let c = first; c <= last; c++) await this.#add(c, -1);
        ranges.shift();
      }
    });
  }

  // --- internals -----------------------------------------------------------------

  #serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#lock.then(fn, fn);
    this.#lock = run.catch(() => {});
    return run;
  }

  /** Grows the file to hold everything allocated, in large steps. */
  async #grow(): Promise<void> {
    const size = this.#file.size;
    if (size >= this.#next) return;
    if (!this.#file.resize) {
      throw new BlockError('ENOSPC', `the image needs ${this.#next} bytes but its storage cannot grow (size ${size})`, {
        ...this.#where,
        op: 'write',
        offset: this.#next,
      });
    }
    const step = Math.min(Math.max(MIN_GROWTH, Math.floor(size / 8)), 1024 * 1024 * 1024);
    await this.#file.resize(Math.ceil((this.#next + step) / this.#cs) * this.#cs);
  }

  /** The last cluster of [host, +count clusters) with a non-zero refcount, or -1. */
  async #lastInUse(host: number, count: number): Promise<number> {
    let found = -1;
    const first = host / this.#cs;
    for (let cluster = first; cluster < first + count; ) {
      const r = Math.floor(cluster / this.#perBlock);
      const blockOffset = this.#blockOffset(r);
      const n = Math.min(first + count - cluster, (r + 1) * this.#perBlock - cluster);
      if (blockOffset !== 0) {
        const block = await this.#cache.get(blockOffset);
        for (let i = 0; i < n; i++)
          if (this.#read(block, (cluster + i) % this.#perBlock) !== 0) found = (cluster + i) * this.#cs;
      }
      cluster += n;
    }
    return found;
  }

  /** Sets the refcount of `count` clusters from `host` from 0 to 1, block by block. */
  async #increment(host: number, count: number): Promise<void> {
    let cluster = host / this.#cs;
    const end = cluster + count;
    while (cluster < end) {
      const r = Math.floor(cluster / this.#perBlock);
      const [blockOffset, block] = await this.#block(r);
      const first = cluster % this.#perBlock;
      const n = Math.min(end - cluster, this.#perBlock - first);
      for (let i = first; i < first + n; i++) {
        const old = this.#read(block, i);
        if (old !== 0) {
          throw corrupt(
            { ...this.#where, op: 'write' },
            'refcount block',
            `cluster ${hex((r * this.#perBlock + i) * this.#cs)} past the end of the used space already has refcount ${old}`,
            blockOffset,
          );
        }
        this.#write(block, i, 1);
      }
      this.#cache.markDirty(blockOffset);
      cluster += n;
    }
  }

  /** Adds `delta` to one cluster's refcount. */
  async #add(cluster: number, delta: number): Promise<void> {
    const r = Math.floor(cluster / this.#perBlock);
    const [blockOffset, block] = await this.#block(r);
    const i = cluster % this.#perBlock;
    const v = this.#read(block, i) + delta;
    if (v < 0 || v > this.#maxRefcount) {
      throw corrupt(
        { ...this.#where, op: 'write' },
        'refcount block',
        `refcount of cluster ${hex(cluster * this.#cs)} would become ${v}`,
        blockOffset,
      );
    }
    this.#write(block, i, v);
    this.#cache.markDirty(blockOffset);
  }

  /** The refcount block for index `r`, created (at the end of the file) when missing. */
  async #block(r: number): Promise<readonly [number, CachedTable]> {
    const existing = this.#blockOffset(r);
    if (existing !== 0) return [existing, await this.#cache.get(existing)];
    if (r >= this.#table.length / 8) {
      await this.#growTable(r + 1);
      // Growing may have created this very block (for the new table's own clusters).
      return this.#block(r);
    }
    const offset = this.#next;
    this.#next += this.#cs;
    await this.#grow();
    const block = this.#cache.add(offset, new Uint8Array(this.#cs));
    this.#setBlockOffset(r, offset);
    // The block's own refcount: in itself when it lies in its own range, else in another block.
    await this.#increment(offset, 1);
    return [offset, block];
  }

  /**
   * Moves the table to a bigger copy at the end of the file, large enough to also
   * describe itself and the blocks that its own clusters need.
   */
  async #growTable(minEntries: number): Promise<void> {
    const cs = this.#cs;
    const perCluster = cs / 8;
    const oldEntries = this.#table.length / 8;
    let clusters = Math.ceil(Math.max(minEntries, Math.ceil(oldEntries * 1.5)) / perCluster);
    // Enough entries for everything up to the table's end, plus blocks for its clusters.
    while (Math.ceil((this.#next / cs + clusters + 2) / this.#perBlock) + 2 > clusters * perCluster) clusters++;
    if (clusters * cs > MAX_REFTABLE_BYTES) {
      throw new BlockError(
        'EFBIG',
        `the image is too large for its refcount table (more than ${MAX_REFTABLE_BYTES} bytes); use larger clusters or refcount_bits`,
        { ...this.#where, op: 'write', field: 'refcount_table_clusters' },
      );
    }
    const table = new Uint8Array(clusters * cs);
    table.set(this.#table);
    this.#oldTables.push([this.#tableOffset, this.#table.length]);
    const offset = this.#next;
    this.#next += clusters * cs;
    await this.#grow();
    this.#table = table;
    this.#tableView = new DataView(table.buffer, table.byteOffset, table.byteLength);
    this.#tableOffset = offset;
    this.#tableDirty = true;
    this.#moved = true;
    await this.#increment(offset, clusters);
  }

  #blockOffset(r: number): number {
    if (r >= this.#table.length / 8) return 0;
    const hi = this.#tableView.getUint32(r * 8);
    const lo = this.#tableView.getUint32(r * 8 + 4);
    const offset = hi * TWO_32 + ((lo & ~(this.#cs - 1)) >>> 0);
    if (offset !== 0 && (offset % this.#cs !== 0 || offset + this.#cs > this.#file.size)) {
      throw corrupt(
        { ...this.#where, op: 'write' },
        'refcount table',
        `refcount table entry ${r}: block offset ${hex(offset)} is unaligned or past the end of the file`,
        this.#tableOffset + r * 8,
      );
    }
    return offset;
  }

  #setBlockOffset(r: number, offset: number): void {
    this.#tableView.setUint32(r * 8, Math.floor(offset / TWO_32));
    this.#tableView.setUint32(r * 8 + 4, offset % TWO_32);
    this.#tableDirty = true;
  }

  #read(t: CachedTable, i: number): number {
    return refcountAt(t.bytes, t.view, this.#bits, i);
  }

  #write(t: CachedTable, i: number, v: number): void {
    setRefcountAt(t.bytes, t.view, this.#bits, i, v);
  }
}

/** One refcount of a block; entries narrower than a byte are packed from the least significant bit, as QEMU stores them. */
export function refcountAt(bytes: Uint8Array, view: DataView, bits: number, i: number): number {
  switch (bits) {
    case 64:
      return view.getUint32(i * 8) * TWO_32 + view.getUint32(i * 8 + 4);
    case 32:
      return view.getUint32(i * 4);
    case 16:
      return view.getUint16(i * 2);
    case 8:
      return bytes[i]!;
    default: {
      const bit = i * bits;
      return (bytes[bit >> 3]! >> (bit & 7)) & ((1 << bits) - 1);
    }
  }
}

export function setRefcountAt(bytes: Uint8Array, view: DataView, bits: number, i: number, v: number): void {
  switch (bits) {
    case 64:
      view.setUint32(i * 8, Math.floor(v / TWO_32));
      view.setUint32(i * 8 + 4, v % TWO_32);
      return;
    case 32:
      view.setUint32(i * 4, v);
      return;
    case 16:
      view.setUint16(i * 2, v);
      return;
    case 8:
      bytes[i] = v;
      return;
    default: {
      const bit = i * bits;
      const mask = ((1 << bits) - 1) << (bit & 7);
      bytes[bit >> 3] = (bytes[bit >> 3]! & ~mask) | ((v << (bit & 7)) & mask);
    }
  }
}
