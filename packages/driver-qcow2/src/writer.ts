/**
 * The write side of an opened qcow2 image: allocating writes from many concurrent
 * callers, zero writes stored as zero flags, discard, and the commits that put
 * metadata on disk in an order that survives a crash at any instant.
 *
 * A write is cut into segments of clusters handled alike:
 * - in place: clusters already allocated get the data at their host offset;
 * - allocating: clusters without a host cluster (unallocated, zero, compressed) get a
 *   contiguous run from the allocator; partial clusters (subclusters with extended
 *   L2) are completed with what the guest read there before (backing file, zeroes,
 *   decompressed data), QEMU's copy-on-write. The L2 entries are changed only once
 *   the data is written, so a table on disk never points at data not yet written.
 * Clusters being allocated are marked in flight; a request that touches one waits.
 *
 * Metadata changes stay in memory (L2 tables and refcount blocks in their caches, the
 * L1 table) until a commit: flush(), close(), or too many dirty tables. A commit takes
 * copies of everything dirty at one instant and writes refcount blocks and table,
 * flush, L2 tables, flush, L1 table; only then are freed clusters released. A crash
 * therefore leaks clusters at worst. With lazy_refcounts the dirty bit is set before
 * the first change and cleared after the last commit, and the refcount barrier is
 * skipped, as QEMU does.
 */
import { BlockError, SegmentList, type GatedBackend, type WriteZeroesFlags } from '@blockconv/core';
import type { TableCache, CachedTable } from './cache.js';
import { corrupt, hex, type Where } from './errors.js';
import { AUTOCLEAR_BITMAPS, INCOMPAT_DIRTY, type Qcow2Header } from './header.js';
import { STORE_UNCOMPRESSED, compressClusters } from './compress.js';
import { compressedEntry, compressedRange, entryOffset } from './mapping.js';
import type { Refcounts } from './refcounts.js';
import { ALL_SUBCLUSTERS, HI_COMPRESSED, HI_COPIED, LO_ZERO, TWO_32 } from './format.js';

/**
 * Longest time metadata stays only in memory while writes go on: a long convert that
 * dies keeps most of what it wrote reachable (and the crash tests see commits).
 */
const COMMIT_INTERVAL_MS = 1000;
/** Freed ranges held for the next commit before one is started for them (a memory bound). */
const MAX_PENDING_FREES = 4096;
/** Compression output buffers kept for reuse; more concurrent requests allocate their own. */
const MAX_SCRATCH_BUFFERS = 8;

/** Header field offsets (qcow2.txt "Header"). */
const H_REFTABLE = 48;
const H_INCOMPAT = 72;
const H_AUTOCLEAR = 88;

export interface WriterParams {
  readonly file: GatedBackend;
  /** Where data clusters live: an external data file (guest offset = host offset there), else the image file. */
  readonly data?: GatedBackend;
  /** data_file_raw: the data file stays a valid raw image, zeroes included. */
  readonly dataFileRaw?: boolean;
  readonly header: Qcow2Header;
  /** The active L1 table, shared with the mapper (changes are seen by reads at once). */
  readonly l1: Uint8Array;
  readonly cache: TableCache;
  readonly refcounts: Refcounts;
  readonly hasBacking: boolean;
  /** Reads guest bytes as the image holds them now: the old contents for copy-on-write. */
  readonly readGuest: (offset: number, length: number, into: Uint8Array) => Promise<unknown>;
  readonly allocBuffer: (size: number) => Uint8Array;
  readonly where: Where;
}

/** A cluster's L2 entry, decoded. */
interface Entry {
  table: CachedTable;
  l2Offset: number;
  /** Byte offset of the entry in its table. */
  at: number;
  /** Host offset of a standard cluster (also a zero cluster's reserved one); -1 when none. */
  host: number;
  compressed: boolean;
  /** Standard L2: the zero flag. */
  zero: boolean;
  /** Extended L2: the bitmaps. */
  zeroBits: number;
  allocBits: number;
  /** The entry's two 32-bit halves as stored (a compressed descriptor is decoded from them). */
  hi: number;
  lo: number;
}

/** Clusters of one allocating segment: later requests touching them wait for `done`. */
interface Inflight {
  readonly done: Promise<void>;
  readonly release: () => void;
}

function inflightRecord(): Inflight {
  let release!: () => void;
  const done = new Promise<void>((r) => {
    release = r;
  });
  return { done, release };
}

export class Qcow2Writer {
  readonly #p: WriterParams;
  readonly #file: GatedBackend;
  /** Where data clusters are written: the data file or the image file. */
  readonly #data: GatedBackend;
  readonly #hasDataFile: boolean;
  readonly #h: Qcow2Header;
  readonly #cs: number;
  readonly #coverage: number;
  readonly #ext: boolean;
  readonly #sc: number;
  readonly #size: number;
  readonly #l1: DataView;
  readonly #cache: TableCache;
  readonly #refs: Refcounts;
  readonly #lazy: boolean;
  /** Guest clusters being allocated or copied-on-write (one record per segment, shared by its clusters). */
  readonly #inflight = new Map<number, Inflight>();
  /** L2 tables being allocated, by L1 index. */
  readonly #newTables = new Map<number, Promise<number>>();
  /** Host ranges no longer referenced by the in-memory tables, freed after the next commit. */
  #frees: Array<readonly [number, number]> = [];
  #l1Dirty = false;
  #begun: Promise<void> | undefined;
  #commit: Promise<void> = Promise.resolve();
  #zeroes: Uint8Array | undefined;
  #incompat: bigint;
  #lastCommit = performance.now();
  /** Refcount structures written since the last flush: the next L2 write must be preceded by one. */
  #refcountsUnflushed = false;
  /** Where the next compressed cluster's bytes go (0: start a new host cluster). */
  #compressedEnd = 0;
  /** Serialises the placement of compressed data. */
  #placing: Promise<unknown> = Promise.resolve();
  /** Output buffers of compression, kept for reuse (MAX_SCRATCH_BUFFERS at most). */
  readonly #scratch: Uint8Array[] = [];

  constructor(p: WriterParams) {
    this.#p = p;
    this.#file = p.file;
    this.#data = p.data ?? p.file;
    this.#hasDataFile = p.data !== undefined;
    this.#h = p.header;
    this.#cs = p.header.clusterSize;
    this.#coverage = p.header.clusterSize * p.header.l2Entries;
    this.#ext = p.header.extendedL2;
    this.#sc = p.header.subclusterSize;
    this.#size = p.header.size;
    this.#l1 = new DataView(p.l1.buffer, p.l1.byteOffset, p.l1.byteLength);
    this.#cache = p.cache;
    this.#refs = p.refcounts;
    this.#lazy = (p.header.compatibleFeatures & 1n) !== 0n;
    this.#incompat = p.header.incompatibleFeatures;
  }

  // --- writes --------------------------------------------------------------------

  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.#begin();
    const end = offset + data.length;
    const tasks: Array<Promise<void>> = [];
    let failure: unknown;
    const track = (t: Promise<void>): void => {
      tasks.push(
        t.catch((err: unknown) => {
          failure ??= err;
        }),
      );
    };
    try {
      for (let pos = offset; pos < end && failure === undefined; ) {
        const waiting = this.#inflight.get(Math.floor(pos / this.#cs));
        if (waiting) {
          await waiting.done;
          continue;
        }
        await this.#entry(pos, true);
        // Synchronous from here to the end of the segment: the entry as it is now, and the in-flight marks, agree.
        const e = this.#entryNow(pos);
        if (!e || this.#inflight.has(Math.floor(pos / this.#cs))) continue;
        const stop = Math.min(end, (Math.floor(pos / this.#coverage) + 1) * this.#coverage);
        if (this.#inPlace(e, pos, end)) {
          let segEnd = Math.min(stop, this.#clusterEnd(pos));
          while (segEnd < stop && !this.#inflight.has(segEnd / this.#cs)) {
            const next = this.#decode(e.table, e.l2Offset, segEnd);
            if (!this.#inPlace(next, segEnd, end) || next.host !== e.host + (segEnd - this.#clusterStart(pos))) break;
            segEnd = Math.min(stop, segEnd + this.#cs);
          }
          track(this.#writeInPlace(e, pos, segEnd, data.subarray(pos - offset, segEnd - offset)));
          pos = segEnd;
        } else {
          const segEnd = this.#allocatingSegmentEnd(e, pos, stop);
          track(
            this.#writeAllocating(
              pos,
              segEnd,
              data.subarray(pos - offset, segEnd - offset),
              e.host >= 0 && !e.compressed,
            ),
          );
          pos = segEnd;
        }
      }
    } catch (err) {
      failure ??= err;
    }
    await Promise.all(tasks);
    if (failure !== undefined) throw failure;
    await this.#commitIfFull();
  }

  /**
   * Data split by zero runs (convert's chunks, GatedBackend.writeSegments): when every
   * piece covers whole clusters that have no host cluster yet, one allocation serves
   * them all and one scattered write puts them there; otherwise piece by piece.
   */
  async writeSegments(data: Uint8Array, segments: SegmentList): Promise<void> {
    await this.#begin();
    const cs = this.#cs;
    const pieces: Array<readonly [number, number, number]> = [];
    let whole = !this.#hasDataFile && this.#data.writeSegments !== undefined;
    for (let i = 0; i < segments.count; i++) {
      const a = segments.offsetAt(i);
      const b = segments.endAt(i);
      pieces.push([a, b, segments.positionAt(i)]);
      if (a % cs !== 0 || (b % cs !== 0 && b !== this.#size)) whole = false;
    }
    if (whole) {
      // Every L2 table the pieces need, read or allocated first; then a synchronous look at every cluster.
      for (const [a, b] of pieces) {
        for (let pos = a; pos < b; pos = (Math.floor(pos / this.#coverage) + 1) * this.#coverage)
          await this.#entry(pos, true);
      }
      whole = pieces.every(([a, b]) => this.#allFresh(a, b));
    }
    if (!whole) {
      await Promise.all(pieces.map(([a, b, s]) => this.write(a, data.subarray(s, s + (b - a)))));
      return;
    }
    const record = inflightRecord();
    let clusters = 0;
    for (const [a, b] of pieces) {
      for (let c = a / cs; c * cs < b; c++) this.#inflight.set(c, record);
      clusters += Math.ceil((b - a) / cs);
    }
    try {
      const host = await this.#refs.allocate(clusters);
      // Pieces no larger than the file takes in one request.
      const max = this.#data.limits.maxTransfer;
      const triples: number[] = [];
      let at = host;
      for (const [a, b, s] of pieces) {
        for (let done = 0; done < b - a; done += max) triples.push(at + done, Math.min(max, b - a - done), s + done);
        at += Math.ceil((b - a) / cs) * cs;
      }
      await this.#data.writeSegments!(data, new SegmentList(Float64Array.from(triples), triples.length / 3));
      // Link, now that the data is written.
      at = host;
      for (const [a, b] of pieces) {
        for (let pos = a; pos < b; pos += cs, at += cs) {
          let e: Entry | undefined;
          while (!(e = this.#entryNow(pos))) await this.#entry(pos, true);
          if (this.#ext) this.#setEntry(e, at, false, e.zeroBits & ~this.#bits(pos, pos, b), this.#bits(pos, pos, b));
          else this.#setEntry(e, at, false, 0, 0);
        }
      }
    } finally {
      for (const [a, b] of pieces) for (let c = a / cs; c * cs < b; c++) this.#inflight.delete(c);
      record.release();
    }
    await this.#commitIfFull();
  }

  /** Are all clusters of [a, b) without a host cluster, uncompressed, not in flight, their tables cached? */
  #allFresh(a: number, b: number): boolean {
    for (let pos = a; pos < b; pos += this.#cs) {
      if (this.#inflight.has(pos / this.#cs)) return false;
      const l2Offset = this.#l2OffsetAt(Math.floor(pos / this.#coverage));
      const table = l2Offset === 0 ? undefined : this.#cache.peek(l2Offset);
      if (!table) return false;
      const e = this.#decode(table, l2Offset, pos);
      if (e.host >= 0 || e.compressed) return false;
    }
    return true;
  }

  /**
   * A compressed write (convert -c): whole clusters from a cluster boundary (the last
   * may stop at the image's end; it is padded with zeroes, as QEMU does). Clusters not
   * yet allocated are stored compressed when that is smaller, their bytes packed one
   * after the other as QEMU's qcow2_alloc_bytes packs them; the others are written
   * normally.
   */
  async writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    await this.#begin();
    const cs = this.#cs;
    if (this.#hasDataFile) {
      throw new BlockError('ENOTSUP', 'compressed clusters cannot be written to an image with an external data file', {
        ...this.#p.where,
        op: 'write',
        offset,
      });
    }
    if (offset % cs !== 0 || (data.length % cs !== 0 && offset + data.length !== this.#size)) {
      throw new BlockError('EINVAL', `compressed writes cover whole ${cs}-byte clusters`, {
        ...this.#p.where,
        op: 'write',
        offset,
        length: data.length,
      });
    }
    const count = Math.ceil(data.length / cs);
    let input = data;
    if (data.length % cs !== 0) {
      input = new Uint8Array(count * cs);
      input.set(data);
    }
    const out = this.#scratch.pop() ?? new Uint8Array(0);
    const packed = out.length >= count * (2 * cs - 1) ? out : new Uint8Array(count * (2 * cs - 1));
    const lengths = new Int32Array(count);
    const plain: Array<Promise<void>> = [];
    const items: number[] = [];
    let failure: unknown;
    try {
      await compressClusters(this.#h.compressionType, cs, input, count, packed, lengths);
      for (let i = 0; i < count; i++) {
        const guest = offset + i * cs;
        const piece = data.subarray(i * cs, Math.min((i + 1) * cs, data.length));
        for (;;) {
          const waiting = this.#inflight.get(guest / cs);
          if (waiting) {
            await waiting.done;
            continue;
          }
          await this.#entry(guest, true);
          const e = this.#entryNow(guest);
          if (!e || this.#inflight.has(guest / cs)) continue;
          if (lengths[i] === STORE_UNCOMPRESSED || e.host >= 0 || e.compressed) plain.push(this.write(guest, piece));
          else {
            items.push(i);
            this.#inflight.set(guest / cs, inflightRecord());
          }
          break;
        }
      }
      // #storeCompressed releases the in-flight marks of `items`, whatever happens.
      const stored = items.splice(0);
      if (stored.length) await this.#storeCompressed(offset, stored, lengths, packed);
    } catch (err) {
      failure = err;
    } finally {
      // Marks left by a failure before #storeCompressed took them over.
      for (const i of items) this.#releaseInflight(offset + i * cs, offset + (i + 1) * cs);
      // The caller's buffer must not be in use when this returns.
      const settled = await Promise.allSettled(plain);
      failure ??= settled.find((r): r is PromiseRejectedResult => r.status === 'rejected')?.reason;
      // A pool as deep as the peak concurrency would keep that many buffers, each as large
      // as the largest request it served: convert issues a chunk's compressed pieces at
      // once, so peaks of hundreds (measured: RSS 275 MiB instead of 110).
      if (this.#scratch.length < MAX_SCRATCH_BUFFERS) this.#scratch.push(packed);
    }
    if (failure !== undefined) throw failure;
    await this.#commitIfFull();
  }

  /** Places, writes and links compressed clusters (`items`: their indexes in the request; data in slots of `packed`). */
  async #storeCompressed(
    offset: number,
    items: readonly number[],
    lengths: Int32Array,
    packed: Uint8Array,
  ): Promise<void> {
    const cs = this.#cs;
    const release = (): void => {
      for (const i of items) this.#releaseInflight(offset + i * cs, offset + (i + 1) * cs);
    };
    try {
      const placed = await this.#place(items.map((i) => lengths[i]!));
      // Runs of neighbouring placements become one write each: their bytes are moved
      // together past the end of the slots (the buffer has room for both).
      const base = Math.ceil(packed.length / 2);
      const writes: Array<Promise<void>> = [];
      let at = base;
      let runFirst = 0;
      let runAt = base;
      for (let k = 0; k < items.length; k++) {
        const i = items[k]!;
        const n = lengths[i]!;
        packed.copyWithin(at, i * (cs - 1), i * (cs - 1) + n);
        at += n;
        if (k === items.length - 1 || placed[k + 1] !== placed[k]! + n) {
          writes.push(this.#writeBytes(placed[runFirst]!, packed.subarray(runAt, at)));
          runFirst = k + 1;
          runAt = at;
        }
      }
      await Promise.all(writes);
      for (let k = 0; k < items.length; k++) {
        const guest = offset + items[k]! * cs;
        let e: Entry | undefined;
        while (!(e = this.#entryNow(guest))) await this.#entry(guest, true);
        this.#setCompressed(e, placed[k]!, lengths[items[k]!]!);
      }
    } finally {
      release();
    }
  }

  /**
   * Host offsets for compressed data of the given sizes, packed byte by byte (a
   * cluster may hold several, and one may run into the next cluster when that is
   * contiguous), with each host cluster's refcount counting the data touching it.
   */
  #place(sizes: readonly number[]): Promise<number[]> {
    const cs = this.#cs;
    const run = this.#placing.then(async () => {
      const out: number[] = [];
      for (const size of sizes) {
        let off = this.#compressedEnd;
        let room = off % cs === 0 ? 0 : cs - (off % cs);
        // A cluster whose refcount is at its maximum (refcount_bits < 16) takes no more data, as in QEMU.
        if (room > 0 && (await this.#refs.get(off)) >= this.#refs.maxRefcount) room = 0;
        const sharesCluster = room > 0;
        let fresh = false;
        while (room < size) {
          const next = await this.#refs.allocate(1);
          if (room > 0 && next === off + room) {
            room += cs;
          } else {
            off = next;
            room = cs;
            fresh = true;
          }
        }
        // A cluster already holding earlier data gets one more reference; new ones have theirs from allocate().
        if (sharesCluster && !fresh) await this.#refs.addReference(off);
        out.push(off);
        this.#compressedEnd = off + size;
      }
      return out;
    });
    this.#placing = run.catch(() => {});
    return run;
  }

  /** Data at `host` (the core's gate splits it at the data file's maxTransfer). */
  #writeData(host: number, bytes: Uint8Array): Promise<void> {
    return this.#data.write(host, bytes);
  }

  /**
   * Writes compressed data, which starts and ends anywhere in a sector: on a file that
   * needs aligned requests the core's gate pads it with read-modify-writes, one at a time.
   */
  #writeBytes(host: number, bytes: Uint8Array): Promise<void> {
    return this.#file.write(host, bytes);
  }

  #setCompressed(e: Entry, host: number, size: number): void {
    const [hi, lo] = compressedEntry(host, size, this.#h.clusterBits);
    const v = e.table.view;
    v.setUint32(e.at, hi);
    v.setUint32(e.at + 4, lo);
    if (this.#ext) {
      v.setUint32(e.at + 8, 0);
      v.setUint32(e.at + 12, 0);
    }
    this.#cache.markDirty(e.l2Offset);
  }

  async writeZeroes(offset: number, length: number, flags?: WriteZeroesFlags): Promise<void> {
    await this.#zeroRange(offset, length, flags?.mayUnmap === true, false);
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.#zeroRange(offset, length, true, true);
  }

  // --- commits -------------------------------------------------------------------

  /** Puts every change on disk, in crash-safe order, then flushes. */
  async flush(): Promise<void> {
    if (this.#hasDataFile) await this.#data.flush();
    await this.#commitAll();
    await this.#file.flush();
  }

  /** Final commit; the file is cut to what is in use and a lazy-refcount dirty bit cleared. */
  async close(): Promise<void> {
    if (this.#begun) await this.#begun;
    else if (!this.dirty) return;
    if (this.#hasDataFile) await this.#data.flush();
    await this.#commitAll();
    if (this.#file.resize && this.#file.size > this.#usedEnd()) await this.#file.resize(this.#usedEnd());
    await this.#file.flush();
    if (this.#lazy && this.#begun) {
      await this.#setIncompat(this.#incompat & ~INCOMPAT_DIRTY);
      await this.#file.flush();
    }
  }

  /** Grows the data file to hold `end` bytes (in steps: each resize is a metadata write). */
  async #growData(end: number): Promise<void> {
    const size = this.#data.size;
    if (size >= end) return;
    if (!this.#data.resize)
      throw new BlockError('ENOSPC', `the data file needs ${end} bytes but cannot grow (size ${size})`, {
        location: this.#data.location,
        op: 'write',
        offset: end,
      });
    await this.#data.resize(Math.min(this.#size, Math.max(end, size + 64 * 1024 * 1024)));
  }

  /** Where the file may end: after the last cluster, or after the compressed data in it (as QEMU leaves it). */
  #usedEnd(): number {
    const end = this.#refs.end;
    const c = this.#compressedEnd;
    return c > end - this.#cs && c <= end ? Math.ceil(c / 512) * 512 : end;
  }

  /**
   * Gives every cluster of [0, size) a host cluster (preallocation=metadata) and
   * returns the host runs of data, for falloc/full to allocate on the storage.
   */
  async preallocate(size: number): Promise<Array<readonly [number, number]>> {
    const runs: Array<readonly [number, number]> = [];
    for (let pos = 0; pos < size; pos += this.#coverage) {
      const e = (await this.#entry(pos, true))!;
      const n = Math.ceil(Math.min(this.#coverage, size - pos) / this.#cs);
      const host = this.#hasDataFile ? pos : await this.#refs.allocate(n);
      for (let i = 0; i < n; i++)
        this.#setEntry(this.#decode(e.table, e.l2Offset, pos + i * this.#cs), host + i * this.#cs, false, 0, 0);
      runs.push([host, n * this.#cs]);
      await this.#commitIfFull();
    }
    return runs;
  }

  get dirty(): boolean {
    return this.#l1Dirty || this.#cache.dirtyCount > 0 || this.#refs.dirty || this.#frees.length > 0;
  }

  // --- internals: segments -------------------------------------------------------

  #clusterStart(pos: number): number {
    return Math.floor(pos / this.#cs) * this.#cs;
  }
  #clusterEnd(pos: number): number {
    return this.#clusterStart(pos) + this.#cs;
  }

  /** Bits of the subclusters [from, to) of the cluster starting at cStart covers. */
  #bits(cStart: number, from: number, to: number): number {
    const first = Math.floor((Math.max(from, cStart) - cStart) / this.#sc);
    const last = Math.ceil((Math.min(to, cStart + this.#cs) - cStart) / this.#sc);
    if (last - first >= 32) return ALL_SUBCLUSTERS;
    return (((1 << (last - first)) - 1) << first) >>> 0;
  }

  /** Subclusters [from, to) covers completely (the image's end counts as a boundary). */
  #fullBits(cStart: number, from: number, to: number): number {
    const lo = Math.ceil((Math.max(from, cStart) - cStart) / this.#sc);
    const top = Math.min(to, cStart + this.#cs);
    const hi = top >= this.#size ? Math.ceil((top - cStart) / this.#sc) : Math.floor((top - cStart) / this.#sc);
    if (hi <= lo) return 0;
    if (hi - lo >= 32) return ALL_SUBCLUSTERS;
    return (((1 << (hi - lo)) - 1) << lo) >>> 0;
  }

  /** Can [pos, end) within this cluster be written at its host offset with no copy-on-write? */
  #inPlace(e: Entry, pos: number, end: number): boolean {
    if (e.host < 0 || e.compressed) return false;
    if (!this.#ext) return !e.zero;
    const cStart = this.#clusterStart(pos);
    const touched = this.#bits(cStart, pos, end);
    // Subclusters touched only in part must already be allocated.
    return (touched & ~this.#fullBits(cStart, pos, end) & ~e.allocBits) === 0;
  }

  /**
   * End of an allocating segment from `pos`: one cluster that has a host cluster but
   * needs copy-on-write, or consecutive clusters without one (fresh host space).
   */
  #allocatingSegmentEnd(e: Entry, pos: number, stop: number): number {
    let segEnd = Math.min(stop, this.#clusterEnd(pos));
    const record = inflightRecord();
    this.#inflight.set(Math.floor(pos / this.#cs), record);
    if (e.host >= 0 && !e.compressed) return segEnd;
    while (segEnd < stop && !this.#inflight.has(segEnd / this.#cs)) {
      const next = this.#decode(e.table, e.l2Offset, segEnd);
      if (next.host >= 0 && !next.compressed) break;
      this.#inflight.set(segEnd / this.#cs, record);
      segEnd = Math.min(stop, segEnd + this.#cs);
    }
    return segEnd;
  }

  #releaseInflight(from: number, to: number): void {
    const record = this.#inflight.get(Math.floor(from / this.#cs));
    for (let c = Math.floor(from / this.#cs); c * this.#cs < to; c++) this.#inflight.delete(c);
    record?.release();
  }

  async #writeInPlace(e: Entry, pos: number, segEnd: number, data: Uint8Array): Promise<void> {
    const host = e.host + (pos - this.#clusterStart(pos));
    await this.#writeData(host, data);
    if (!this.#ext) return;
    // Subclusters written whole become allocated (the others were already), unless a
    // discard took the cluster away meanwhile.
    const first = this.#clusterStart(pos);
    for (let c = first; c < segEnd; c += this.#cs) {
      let cur: Entry | undefined;
      while (!(cur = this.#entryNow(c))) await this.#entry(c, true);
      if (cur.host !== e.host + (c - first)) continue;
      const full = this.#fullBits(c, pos, segEnd);
      if ((cur.allocBits & full) === full && (cur.zeroBits & full) === 0) continue;
      this.#setExtBits(cur, cur.zeroBits & ~full, cur.allocBits | full);
    }
  }

  /**
   * Writes [pos, segEnd) to clusters that need a host cluster (`hosted`: the one
   * cluster has one already, e.g. a preallocated zero cluster) and links them.
   */
  async #writeAllocating(pos: number, segEnd: number, data: Uint8Array, hostedAtStart: boolean): Promise<void> {
    let hosted = hostedAtStart;
    const firstCluster = this.#clusterStart(pos);
    const clusters = Math.ceil((segEnd - firstCluster) / this.#cs);
    try {
      let first: Entry | undefined;
      while (!(first = this.#entryNow(pos))) await this.#entry(pos, true);
      const old: Entry[] = [];
      for (let c = 0; c < clusters; c++)
        old.push(c === 0 ? first : this.#decode(first.table, first.l2Offset, firstCluster + c * this.#cs));
      // The clusters are ours (in flight), but the host cluster may have gone meanwhile.
      if (hosted && (old[0]!.host < 0 || old[0]!.compressed)) hosted = false;
      // Copy-on-write range: whole clusters, or whole subclusters with extended L2
      // (a compressed cluster is one unit there too). An allocated subcluster needs no
      // copy, and must get none: a concurrent in-place write may be filling it.
      const unitStart = this.#ext && !old[0]!.compressed ? this.#sc : this.#cs;
      const unitEnd = this.#ext && !old[clusters - 1]!.compressed ? this.#sc : this.#cs;
      let start = Math.floor(pos / unitStart) * unitStart;
      let end = Math.min(Math.ceil(segEnd / unitEnd) * unitEnd, this.#size);
      if (this.#ext && hosted) {
        const bitOf = (at: number): number => 1 << Math.floor((at - firstCluster) / this.#sc);
        if (start < pos && (old[0]!.allocBits & bitOf(pos)) !== 0) start = pos;
        if (end > segEnd && (old[0]!.allocBits & bitOf(segEnd)) !== 0) end = segEnd;
      }
      let buf = data;
      if (start < pos || end > segEnd) {
        buf = this.#p.allocBuffer(end - start);
        const tasks: Array<Promise<unknown>> = [];
        if (start < pos) tasks.push(this.#p.readGuest(start, pos - start, buf.subarray(0, pos - start)));
        if (end > segEnd)
          tasks.push(this.#p.readGuest(segEnd, end - segEnd, buf.subarray(segEnd - start, end - start)));
        await Promise.all(tasks);
        buf.set(data, pos - start);
      }
      // An external data file maps guest offsets one to one; the image file allocates.
      const host = hosted ? old[0]!.host : this.#hasDataFile ? firstCluster : await this.#refs.allocate(clusters);
      if (this.#hasDataFile) await this.#growData(host + (end - firstCluster));
      await this.#writeData(host + (start - firstCluster), buf);
      // Link, now that the data is written.
      for (let c = 0; c < clusters; c++) {
        const cStart = firstCluster + c * this.#cs;
        let e: Entry | undefined;
        while (!(e = this.#entryNow(cStart))) await this.#entry(cStart, true);
        if (e.compressed) this.#frees.push(this.#compressedRange(e));
        const h = host + c * this.#cs;
        if (this.#ext) {
          const written = this.#bits(cStart, start, end);
          const alloc = e.compressed ? ALL_SUBCLUSTERS : (hosted ? e.allocBits : 0) | written;
          this.#setEntry(e, h, false, e.compressed ? 0 : e.zeroBits & ~alloc, alloc);
        } else {
          this.#setEntry(e, h, false, 0, 0);
        }
      }
    } finally {
      this.#releaseInflight(firstCluster, segEnd);
    }
  }

  /**
   * writeZeroes, and discard (whole clusters or subclusters only, nothing written).
   * Version 3 stores zeroes as flags (bitmaps with extended L2); version 2 has none,
   * so it deallocates when no backing file shows through, else writes zeroes.
   */
  async #zeroRange(offset: number, length: number, mayUnmap: boolean, discard: boolean): Promise<void> {
    await this.#begin();
    if (this.#p.dataFileRaw && offset < this.#data.size) {
      // A raw data file must read as the image does.
      await this.#data.writeZeroes(offset, Math.min(length, this.#data.size - offset), { mayUnmap: true });
    }
    const end = offset + length;
    const backing = this.#p.hasBacking;
    const v3 = this.#h.version === 3;
    const zeroes = (from: number, to: number): Promise<void> =>
      discard ? Promise.resolve() : this.write(from, this.#zeroBuffer().subarray(0, to - from));
    for (let pos = offset; pos < end; ) {
      const c = Math.floor(pos / this.#cs);
      const waiting = this.#inflight.get(c);
      if (waiting) {
        await waiting.done;
        continue;
      }
      const cStart = c * this.#cs;
      const cEnd = Math.min(cStart + this.#cs, end);
      const whole = pos === cStart && (cEnd === cStart + this.#cs || cEnd >= this.#size);
      const l1Index = Math.floor(pos / this.#coverage);
      if (this.#l2OffsetAt(l1Index) === 0 && !backing) {
        // No L2 table and nothing below: the whole range already reads as zeroes.
        pos = Math.min(end, (l1Index + 1) * this.#coverage);
        continue;
      }
      if (!whole && !this.#ext) {
        await zeroes(pos, cEnd);
        pos = cEnd;
        continue;
      }
      // A memory bound: a zero write over a huge range commits its tables as it goes.
      if (pos % this.#coverage === 0 || pos === offset) await this.#commitIfFull();
      await this.#entry(pos, backing && v3);
      // Synchronous from here: the entry as it is now (undefined: no L2 table).
      if (this.#inflight.has(c) || !this.#tableCached(pos)) continue;
      const e = this.#entryNow(pos);
      const allocated = e !== undefined && (e.host >= 0 || e.compressed);
      if (!v3) {
        if (backing) await zeroes(pos, cEnd);
        else if (allocated && (mayUnmap || discard)) this.#release(e!, -1);
        else if (allocated) await zeroes(pos, cEnd);
      } else if (!e) {
        // No table: only possible without a backing file, where that reads as zeroes.
      } else if (!this.#ext) {
        if (allocated || e.zero || backing) {
          if (discard && !backing) this.#release(e, -1);
          else this.#release(e, mayUnmap || discard ? -1 : e.host, true);
        }
      } else {
        await this.#zeroExtended(e, pos, cEnd, mayUnmap, discard, zeroes);
      }
      pos = cEnd;
    }
  }

  /** Zeroes [pos, cEnd) of one cluster with extended L2: whole subclusters by their bits, pieces by writing. */
  async #zeroExtended(
    e: Entry,
    pos: number,
    cEnd: number,
    mayUnmap: boolean,
    discard: boolean,
    zeroes: (from: number, to: number) => Promise<void>,
  ): Promise<void> {
    // `e` is current on entry; after the awaits below it is looked up again.
    const cStart = this.#clusterStart(pos);
    const full = this.#fullBits(cStart, pos, cEnd);
    const unallocate = discard && !this.#p.hasBacking;
    if (e.compressed) {
      // A compressed cluster changes as a whole: in part, through a copy-on-write write.
      if (full !== ALL_SUBCLUSTERS) return zeroes(pos, cEnd);
      this.#frees.push(this.#compressedRange(e));
      this.#setEntry(e, -1, false, unallocate ? 0 : ALL_SUBCLUSTERS, 0);
      return;
    }
    // Pieces of subclusters at either end.
    const headEnd = Math.min(cEnd, Math.ceil(pos / this.#sc) * this.#sc);
    if (headEnd > pos && pos % this.#sc !== 0) await zeroes(pos, headEnd);
    const tailStart = Math.max(headEnd, Math.floor(cEnd / this.#sc) * this.#sc);
    if (tailStart < cEnd && cEnd < this.#size) await zeroes(tailStart, cEnd);
    if (!full) return;
    let cur: Entry | undefined;
    while (!(cur = this.#entryNow(cStart))) await this.#entry(cStart, true);
    if (cur.compressed) return zeroes(pos, cEnd);
    const alloc = (cur.allocBits & ~full) >>> 0;
    const zeroBits = (unallocate ? cur.zeroBits & ~full : cur.zeroBits | full) >>> 0;
    if (cur.host >= 0 && alloc === 0 && (mayUnmap || discard)) {
      if (!this.#hasDataFile) this.#frees.push([cur.host, this.#cs]);
      this.#setEntry(cur, -1, false, zeroBits, 0);
    } else {
      this.#setEntry(cur, cur.host, false, zeroBits, alloc);
    }
  }

  /** Makes a standard cluster zero (`zero`) or unallocated, keeping `keepHost` reserved (-1: none); frees what it held otherwise. */
  #release(e: Entry, keepHost: number, zero = false): void {
    if (e.compressed) this.#frees.push(this.#compressedRange(e));
    else if (e.host >= 0 && keepHost < 0 && !this.#hasDataFile) this.#frees.push([e.host, this.#cs]);
    if (this.#ext) this.#setEntry(e, keepHost, false, zero ? ALL_SUBCLUSTERS : 0, 0);
    else this.#setEntry(e, e.compressed ? -1 : keepHost, zero, 0, 0);
  }

  #zeroBuffer(): Uint8Array {
    if (!this.#zeroes) {
      this.#zeroes = this.#p.allocBuffer(this.#cs);
      this.#zeroes.fill(0);
    }
    return this.#zeroes;
  }

  // --- internals: tables ---------------------------------------------------------

  #l2OffsetAt(l1Index: number): number {
    const hi = this.#l1.getUint32(l1Index * 8);
    const lo = this.#l1.getUint32(l1Index * 8 + 4);
    return entryOffset(hi, lo);
  }

  /** The entry of the cluster at `pos` as it is now, when its L2 table is cached; undefined otherwise (or without a table). */
  #entryNow(pos: number): Entry | undefined {
    const l2Offset = this.#l2OffsetAt(Math.floor(pos / this.#coverage));
    if (l2Offset === 0) return undefined;
    const table = this.#cache.peek(l2Offset);
    return table ? this.#decode(table, l2Offset, pos) : undefined;
  }

  /** Whether #entryNow answers for `pos`: there is no L2 table, or it is cached. */
  #tableCached(pos: number): boolean {
    const l2Offset = this.#l2OffsetAt(Math.floor(pos / this.#coverage));
    return l2Offset === 0 || this.#cache.peek(l2Offset) !== undefined;
  }

  /** The L2 entry of the cluster at `pos`; its table is read, or allocated when `create` (else undefined when there is none). */
  async #entry(pos: number, create: boolean): Promise<Entry | undefined> {
    const l1Index = Math.floor(pos / this.#coverage);
    let l2Offset = this.#l2OffsetAt(l1Index);
    if (l2Offset === 0) {
      if (!create) return undefined;
      l2Offset = await this.#newTable(l1Index);
    }
    if (l2Offset % this.#cs !== 0 || l2Offset + this.#cs > this.#file.size) {
      throw corrupt(
        this.#p.where,
        'L1 entry',
        `L1 entry ${l1Index}: L2 table offset ${hex(l2Offset)} is unaligned or outside the file`,
        this.#h.l1TableOffset + l1Index * 8,
      );
    }
    const table = await this.#cache.get(l2Offset);
    return this.#decode(table, l2Offset, pos);
  }

  #newTable(l1Index: number): Promise<number> {
    let p = this.#newTables.get(l1Index);
    if (!p) {
      p = (async () => {
        const offset = await this.#refs.allocate(1);
        this.#cache.add(offset, new Uint8Array(this.#cs));
        // The table is empty, so pointing at it before it is on disk changes nothing a reader sees; the commit writes it first.
        this.#l1.setUint32(l1Index * 8, (HI_COPIED | Math.floor(offset / TWO_32)) >>> 0);
        this.#l1.setUint32(l1Index * 8 + 4, offset % TWO_32);
        this.#l1Dirty = true;
        return offset;
      })().finally(() => this.#newTables.delete(l1Index));
      this.#newTables.set(l1Index, p);
    }
    return p;
  }

  #decode(table: CachedTable, l2Offset: number, pos: number): Entry {
    const index = Math.floor(pos / this.#cs) % this.#h.l2Entries;
    const at = index * this.#h.l2EntrySize;
    const hi = table.view.getUint32(at);
    const lo = table.view.getUint32(at + 4);
    const compressed = (hi & HI_COMPRESSED) !== 0;
    const offset = entryOffset(hi, lo);
    // Offset 0 is "none", except in a data file, where the copied flag marks guest cluster 0 allocated.
    const host = compressed || (offset === 0 && !(this.#hasDataFile && (hi & HI_COPIED) !== 0)) ? -1 : offset;
    const e: Entry = {
      table,
      l2Offset,
      at,
      host,
      compressed,
      zero: !compressed && (lo & LO_ZERO) !== 0,
      zeroBits: 0,
      allocBits: 0,
      hi,
      lo,
    };
    if (this.#ext) {
      e.zeroBits = table.view.getUint32(at + 8);
      e.allocBits = table.view.getUint32(at + 12);
    }
    return e;
  }

  /** Host bytes a compressed cluster's descriptor covers (qcow2.txt "Compressed Clusters Descriptor"). */
  #compressedRange(e: Entry): readonly [number, number] {
    return compressedRange(e.hi, e.lo, this.#h.clusterBits);
  }

  #setEntry(e: Entry, host: number, zero: boolean, zeroBits: number, allocBits: number): void {
    const v = e.table.view;
    v.setUint32(e.at, host < 0 ? 0 : (HI_COPIED | Math.floor(host / TWO_32)) >>> 0);
    v.setUint32(e.at + 4, ((host < 0 ? 0 : host % TWO_32) | (zero ? LO_ZERO : 0)) >>> 0);
    if (this.#ext) {
      v.setUint32(e.at + 8, zeroBits >>> 0);
      v.setUint32(e.at + 12, allocBits >>> 0);
    }
    this.#cache.markDirty(e.l2Offset);
  }

  #setExtBits(e: Entry, zeroBits: number, allocBits: number): void {
    e.table.view.setUint32(e.at + 8, zeroBits >>> 0);
    e.table.view.setUint32(e.at + 12, allocBits >>> 0);
    this.#cache.markDirty(e.l2Offset);
  }

  // --- internals: header and commits ---------------------------------------------

  /** Before the first change: stale autoclear features dropped, the dirty bit set for lazy refcounts. */
  #begin(): Promise<void> {
    this.#begun ??= (async () => {
      if ((this.#h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n) {
        // Bitmaps are not kept up to date here: the autoclear bit tells other programs they are stale.
        await this.#writeHeaderU64(H_AUTOCLEAR, this.#h.autoclearFeatures & ~AUTOCLEAR_BITMAPS);
      }
      if (this.#lazy) await this.#setIncompat(this.#incompat | INCOMPAT_DIRTY);
      await this.#file.flush();
    })();
    return this.#begun;
  }

  async #setIncompat(v: bigint): Promise<void> {
    this.#incompat = v;
    await this.#writeHeaderU64(H_INCOMPAT, v);
  }

  async #writeHeaderU64(at: number, v: bigint): Promise<void> {
    if (this.#h.version < 3) return;
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, v);
    await this.#file.write(at, b);
  }

  /** Commits when the caches fill up with dirty tables, and at least every COMMIT_INTERVAL_MS while writing. */
  async #commitIfFull(): Promise<void> {
    const now = performance.now();
    const due = now - this.#lastCommit >= COMMIT_INTERVAL_MS;
    if (
      due ||
      this.#cache.dirtyCount * 2 >= this.#cache.capacity ||
      this.#refs.dirtyBlocks >= 64 ||
      this.#frees.length >= MAX_PENDING_FREES
    ) {
      // One caller commits; the others of the same instant need not queue more.
      this.#lastCommit = now;
      await this.#commitAll();
    }
  }

  /** Commits until nothing is dirty (applying frees dirties refcount blocks again). */
  async #commitAll(): Promise<void> {
    for (let i = 0; i < 4 && this.dirty; i++) await this.#commitOnce();
  }

  #commitOnce(): Promise<void> {
    const run = this.#commit.then(() => this.#doCommit());
    this.#commit = run.catch(() => {});
    return run;
  }

  async #doCommit(): Promise<void> {
    this.#lastCommit = performance.now();
    if (!this.dirty) return;
    const file = this.#file;
    // Data in an external data file before metadata that points at it (as QEMU flushes
    // the data file first).
    if (this.#hasDataFile && !this.#lazy) await this.#data.flush();
    // One instant, between allocations: every L2 entry in these copies points at clusters whose refcounts are in `rc`.
    const { frees, l2, l1, rc } = await this.#refs.exclusive(() => {
      const taken = {
        frees: this.#frees,
        l2: this.#cache.takeDirty(),
        l1: this.#l1Dirty
          ? new Uint8Array(this.#l1.buffer, this.#l1.byteOffset, this.#l1.byteLength).slice()
          : undefined,
        rc: this.#refs.capture(),
      };
      this.#frees = [];
      this.#l1Dirty = false;
      return taken;
    });
    let stage = 'refcount blocks';
    let l2Written = false;
    let rcWritten = false;
    // What is left to free (applyFrees removes what it applied).
    const released = [...frees, ...rc.freeAfter];
    let freeing = false;
    try {
      await Promise.all(rc.blocks.map((b) => file.write(b.offset, b.bytes)));
      if (rc.blocks.length) this.#refcountsUnflushed = true;
      if (rc.table) {
        // New refcount blocks before the table entries that hook them in.
        if (rc.blocks.length && !this.#lazy) await this.#flushFile();
        stage = 'refcount table';
        await file.write(rc.table.offset, rc.table.bytes);
        this.#refcountsUnflushed = true;
      }
      if (rc.moved) {
        stage = 'header';
        await this.#flushFile();
        const b = new Uint8Array(12);
        const dv = new DataView(b.buffer);
        dv.setBigUint64(0, BigInt(rc.moved.offset));
        dv.setUint32(8, rc.moved.clusters);
        await file.write(H_REFTABLE, b);
      }
      this.#refs.committed(rc);
      rcWritten = true;
      if (l2.length || l1) {
        // Refcounts (of this commit or an earlier one) before the references to the clusters they count.
        if (!this.#lazy && this.#refcountsUnflushed) await this.#flushFile();
        stage = 'L2 tables';
        await Promise.all(l2.map((t) => file.write(t.offset, t.bytes)));
        this.#cache.written(l2);
        l2Written = true;
        if (l1) {
          stage = 'L1 table';
          await this.#flushFile();
          await file.write(this.#h.l1TableOffset, l1);
        }
      }
      if (released.length) {
        // Nothing on disk refers to these any more once the tables above are stable.
        stage = 'freeing clusters';
        if (!this.#lazy) await this.#flushFile();
        freeing = true;
        await this.#refs.applyFrees(released);
      }
    } catch (err) {
      if (!l2Written) this.#cache.written(l2, true);
      if (l1 && stage !== 'freeing clusters') this.#l1Dirty = true;
      if (!rcWritten) this.#refs.restore(rc);
      // Frees not applied yet go back: the next commit applies them (never twice).
      if (freeing || stage === 'freeing clusters') this.#frees.push(...released);
      else {
        this.#frees.push(...frees);
        if (rcWritten) this.#refs.requeueOldTables(rc);
      }
      if (err instanceof BlockError)
        throw new BlockError(err.code, `committing metadata (${stage}): ${err.message}`, {
          location: this.#p.where.location,
          op: 'flush',
          offset: err.offset,
          cause: err,
        });
      throw err;
    }
  }

  async #flushFile(): Promise<void> {
    await this.#file.flush();
    this.#refcountsUnflushed = false;
  }
}
