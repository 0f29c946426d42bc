/**
 * Guest-to-host cluster mapping through the L1 and L2 tables (qcow2.txt "Cluster
 * mapping" and "Extended L2 Entries"). One primitive serves both read() and
 * blockStatus(): `lookup` describes the longest run starting at a guest offset whose
 * clusters (or subclusters) have the same kind and, for data, are contiguous in the
 * host file, so that a read becomes one protocol request per run and block status
 * one extent per run. Entries are decoded straight from the cached big-endian tables
 * with 32-bit reads: no BigInt and no allocation per cluster. Every entry is checked
 * when it is used (alignment, inside the file, consistent bitmaps), as QEMU does.
 */
import type { TableCache, CachedTable } from './cache.js';
import { corrupt, hex, type Where } from './errors.js';
import type { Qcow2Header } from './header.js';
import { HI_COMPRESSED, HI_COPIED, HI_OFFSET_MASK, LO_OFFSET_MASK, TWO_32 } from './format.js';

export const KIND_UNALLOCATED = 0;
export const KIND_ZERO = 1;
export const KIND_DATA = 2;
export const KIND_COMPRESSED = 3;
export type RunKind = typeof KIND_UNALLOCATED | typeof KIND_ZERO | typeof KIND_DATA | typeof KIND_COMPRESSED;

/** A run of guest bytes of one kind, filled in by ClusterMapper.lookup. */
export interface Run {
  kind: RunKind;
  /** Guest bytes from the asked offset; at least 1, at most the asked length. */
  length: number;
  /**
   * DATA: host offset (in the data file) of the run's first byte. ZERO: the same for a
   * preallocated zero cluster (reported by map), else -1. COMPRESSED: host offset of
   * the compressed data (-1 in status lookups, which merge compressed clusters).
   * UNALLOCATED: -1, except in status lookups of subclusters whose cluster has host
   * space reserved (map reports it, as qemu-img does).
   */
  host: number;
  /** COMPRESSED: bytes of compressed data the descriptor covers (may run past the end of the file). */
  csize: number;
}

/** The offset field (bits 9-55) of an L1 or standard L2 entry, from its two 32-bit halves. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & HI_OFFSET_MASK) * TWO_32 + ((lo & LO_OFFSET_MASK) >>> 0);
}

/**
 * Host bytes a compressed cluster's descriptor covers (qcow2.txt "Compressed Clusters
 * Descriptor": x = 62 - (cluster_bits - 8) bits of offset, then the count of further
 * 512-byte sectors), from the entry's two 32-bit halves. The mapper keeps its own
 * precomputed form of this for the read path.
 */
export function compressedRange(hi: number, lo: number, clusterBits: number): readonly [number, number] {
  const highBits = 70 - clusterBits - 32;
  const host = (hi & 0x3fff_ffff & ((1 << highBits) - 1)) * TWO_32 + lo;
  const sectors = (((hi & 0x3fff_ffff) >>> highBits) & ((1 << (clusterBits - 8)) - 1)) + 1;
  return [host, sectors * 512 - (host % 512)];
}

/** The two 32-bit halves of a compressed cluster's L2 entry for `size` bytes at `host`. */
export function compressedEntry(host: number, size: number, clusterBits: number): readonly [number, number] {
  const highBits = 70 - clusterBits - 32;
  const sectors = Math.floor((host + size - 1) / 512) - Math.floor(host / 512);
  return [(HI_COMPRESSED + sectors * 2 ** highBits + Math.floor(host / TWO_32)) >>> 0, host % TWO_32];
}

export function newRun(): Run {
  return { kind: KIND_UNALLOCATED, length: 0, host: -1, csize: 0 };
}

const NO_KIND = -1;

export interface MapperParams {
  readonly header: Qcow2Header;
  /** The L1 table in use (the active one or a snapshot's), as stored; may be shorter than the virtual size needs. */
  readonly l1: Uint8Array;
  /** Offset of that L1 table in the file, for messages. */
  readonly l1Offset: number;
  readonly cache: TableCache;
  /** The image file (its size, read live as a writer grows it): metadata and compressed data must lie inside it. */
  readonly file: { readonly size: number };
  /** The file data clusters live in: the external data file when there is one. */
  readonly dataFile: { readonly size: number };
  readonly hasDataFile: boolean;
  readonly where: Where;
}

export class ClusterMapper {
  readonly #h: Qcow2Header;
  readonly #l1: DataView;
  readonly #l1Entries: number;
  readonly #l1Offset: number;
  readonly #cache: TableCache;
  readonly #file: { readonly size: number };
  readonly #dataFile: { readonly size: number };
  readonly #hasDataFile: boolean;
  readonly #where: Where;
  readonly #clusterSize: number;
  /** Guest bytes one L2 table maps. */
  readonly #coverage: number;
  // Compressed descriptor layout (qcow2.txt: x = 62 - (cluster_bits - 8)), split at bit 32.
  readonly #cHighBits: number;
  readonly #cSectorsMask: number;

  constructor(p: MapperParams) {
    this.#h = p.header;
    this.#l1 = new DataView(p.l1.buffer, p.l1.byteOffset, p.l1.byteLength);
    this.#l1Entries = Math.floor(p.l1.byteLength / 8);
    this.#l1Offset = p.l1Offset;
    this.#cache = p.cache;
    this.#file = p.file;
    this.#dataFile = p.dataFile;
    this.#hasDataFile = p.hasDataFile;
    this.#where = p.where;
    this.#clusterSize = p.header.clusterSize;
    this.#coverage = p.header.clusterSize * p.header.l2Entries;
    this.#cHighBits = 70 - p.header.clusterBits - 32;
    this.#cSectorsMask = (1 << (p.header.clusterBits - 8)) - 1;
  }

  /**
   * Fills `run` with the run at guest offset `start`, at most `maxLen` bytes. It
   * completes synchronously (returns undefined) when the L2 tables it needs are
   * cached. `loadBudget` caps the L2 tables read to extend the run beyond the first
   * one (block status stays cheap; read() needs the whole range and passes Infinity).
   * `forStatus` merges neighbouring compressed clusters into one run without a host
   * offset (block status and map report them so); read() decompresses them one by one.
   */
  lookup(start: number, maxLen: number, run: Run, loadBudget = Infinity, forStatus = false): Promise<void> | undefined {
    run.kind = NO_KIND as RunKind;
    run.length = 0;
    run.host = -1;
    run.csize = 0;
    const need = this.#extend(start, maxLen, run, false, -1, undefined, forStatus);
    return need === 0 ? undefined : this.#lookupSlow(start, maxLen, run, loadBudget, need, forStatus);
  }

  async #lookupSlow(
    start: number,
    maxLen: number,
    run: Run,
    budget: number,
    need: number,
    forStatus: boolean,
  ): Promise<void> {
    while (need !== 0) {
      const table = await this.#cache.get(need);
      budget--;
      // The table just read is passed along, so that progress never depends on it still being cached.
      need = this.#extend(start, maxLen, run, budget <= 0, need, table, forStatus);
    }
  }

  /**
   * Grows `run` unit by unit (cluster, subcluster, or a whole unallocated L2 range).
   * Returns 0 when the run is complete, or the offset of an L2 table to read first.
   */
  #extend(
    start: number,
    maxLen: number,
    run: Run,
    stopAtUncached: boolean,
    pinnedOffset: number,
    pinned: CachedTable | undefined,
    forStatus: boolean,
  ): number {
    const end = start + maxLen;
    const h = this.#h;
    const cs = this.#clusterSize;
    for (;;) {
      const p = start + run.length;
      if (p >= end) return 0;
      const l1Index = Math.floor(p / this.#coverage);
      let kind: RunKind;
      let host = -1;
      let csize = 0;
      let unitEnd: number;
      const l2Offset = l1Index < this.#l1Entries ? this.#l2Offset(l1Index) : 0;
      if (l2Offset === 0) {
        // No L2 table (or past a snapshot's shorter L1 table): the whole range is unallocated.
        kind = KIND_UNALLOCATED;
        unitEnd = l1Index < this.#l1Entries ? (l1Index + 1) * this.#coverage : end;
      } else {
        const table = l2Offset === pinnedOffset ? pinned : this.#cache.peek(l2Offset);
        if (!table) return run.length > 0 && stopAtUncached ? 0 : l2Offset;
        const cluster = Math.floor(p / cs);
        const clusterStart = cluster * cs;
        const index = cluster % h.l2Entries;
        const at = index * h.l2EntrySize;
        const hi = table.view.getUint32(at);
        const lo = table.view.getUint32(at + 4);
        unitEnd = clusterStart + cs;
        if (hi & HI_COMPRESSED) {
          kind = KIND_COMPRESSED;
          host = (hi & 0x3fff_ffff & ((1 << this.#cHighBits) - 1)) * TWO_32 + lo;
          const sectors = (((hi & 0x3fff_ffff) >>> this.#cHighBits) & this.#cSectorsMask) + 1;
          csize = sectors * 512 - (host % 512);
          this.#checkCompressed(l2Offset, index, host);
          if (forStatus) host = -1;
        } else {
          const hostOffset = entryOffset(hi, lo);
          // Offset 0 is unallocated, except in an external data file where the copied flag (bit 63) disambiguates.
          const allocated = hostOffset !== 0 || (this.#hasDataFile && (hi & HI_COPIED) !== 0);
          if (!h.extendedL2) {
            if (lo & 1 && h.version === 2) {
              throw corrupt(
                this.#where,
                'L2 entry',
                `L2 entry ${index} of the table at ${hex(l2Offset)}: zero cluster flag in a version 2 image`,
                l2Offset + at,
              );
            }
            if (lo & 1) {
              kind = KIND_ZERO;
              if (hostOffset !== 0)
                host = this.#checkHost(l2Offset, index, hostOffset, clusterStart, false) + (p - clusterStart);
            } else if (!allocated) {
              kind = KIND_UNALLOCATED;
            } else {
              kind = KIND_DATA;
              host = this.#checkHost(l2Offset, index, hostOffset, clusterStart, true) + (p - clusterStart);
            }
          } else {
            const zeroBits = table.view.getUint32(at + 8);
            const allocBits = table.view.getUint32(at + 12);
            const sc = Math.floor((p - clusterStart) / h.subclusterSize);
            const bit = 1 << sc;
            if (!allocated) {
              if (allocBits !== 0)
                this.#invalidBitmap(l2Offset, index, 'subclusters are marked allocated in an unallocated cluster');
              kind = zeroBits & bit ? KIND_ZERO : KIND_UNALLOCATED;
            } else {
              if ((zeroBits & allocBits) !== 0)
                this.#invalidBitmap(l2Offset, index, 'subclusters are marked both allocated and zero');
              const base = this.#checkHost(l2Offset, index, hostOffset, clusterStart, (allocBits & bit) !== 0);
              if (zeroBits & bit) {
                kind = KIND_ZERO;
                host = base + (p - clusterStart);
              } else if (allocBits & bit) {
                kind = KIND_DATA;
                host = base + (p - clusterStart);
              } else {
                // Host space reserved, contents from the backing file; map reports where.
                kind = KIND_UNALLOCATED;
                if (forStatus) host = base + (p - clusterStart);
              }
            }
            unitEnd = clusterStart + (sc + 1) * h.subclusterSize;
          }
        }
      }
      const unitLen = Math.min(unitEnd, end) - p;
      if ((run.kind as number) === NO_KIND) {
        run.kind = kind;
        run.host = host;
        run.csize = csize;
      } else if (
        kind !== run.kind ||
        (kind === KIND_COMPRESSED && !forStatus) ||
        run.host < 0 !== host < 0 ||
        (host >= 0 && host !== run.host + run.length)
      ) {
        return 0;
      }
      run.length += unitLen;
      // read() decompresses each compressed cluster as a whole: one per run.
      if (kind === KIND_COMPRESSED && !forStatus) return 0;
    }
  }

  /** The L2 table offset of L1 entry `index`, checked; 0 when the entry is unallocated. */
  #l2Offset(index: number): number {
    const hi = this.#l1.getUint32(index * 8);
    const lo = this.#l1.getUint32(index * 8 + 4);
    const offset = entryOffset(hi, lo);
    if (offset === 0) return 0;
    const entryAt = this.#l1Offset + index * 8;
    if (offset % this.#clusterSize !== 0) {
      throw corrupt(
        this.#where,
        'L1 entry',
        `L1 entry ${index}: L2 table offset ${hex(offset)} is not aligned to a cluster`,
        entryAt,
      );
    }
    if (offset < this.#clusterSize || offset + this.#clusterSize > this.#file.size) {
      throw corrupt(
        this.#where,
        'L1 entry',
        `L1 entry ${index}: L2 table at ${hex(offset)} lies outside the file (${this.#file.size} bytes) or in the header`,
        entryAt,
      );
    }
    return offset;
  }

  /** Checks a standard cluster's host offset; `reads` when its data will be read from the file. */
  #checkHost(l2Offset: number, index: number, hostOffset: number, guestClusterStart: number, reads: boolean): number {
    const entryAt = l2Offset + index * this.#h.l2EntrySize;
    if (hostOffset % this.#clusterSize !== 0) {
      throw corrupt(
        this.#where,
        'L2 entry',
        `L2 entry ${index} of the table at ${hex(l2Offset)}: cluster offset ${hex(hostOffset)} is not aligned to a cluster`,
        entryAt,
      );
    }
    if (this.#hasDataFile) {
      // External data files map guest offsets one to one.
      if (hostOffset !== guestClusterStart) {
        throw corrupt(
          this.#where,
          'L2 entry',
          `L2 entry ${index} of the table at ${hex(l2Offset)}: data file offset ${hex(hostOffset)} differs from the guest offset ${hex(guestClusterStart)}`,
          entryAt,
        );
      }
    } else if (hostOffset < this.#clusterSize) {
      throw corrupt(
        this.#where,
        'L2 entry',
        `L2 entry ${index} of the table at ${hex(l2Offset)}: cluster offset ${hex(hostOffset)} lies in the header`,
        entryAt,
      );
    }
    if (reads && hostOffset >= this.#dataFile.size) {
      throw corrupt(
        this.#where,
        'L2 entry',
        `L2 entry ${index} of the table at ${hex(l2Offset)}: cluster offset ${hex(hostOffset)} lies past the end of the ${this.#hasDataFile ? 'data file' : 'file'} (${this.#dataFile.size} bytes)`,
        entryAt,
      );
    }
    return hostOffset;
  }

  #checkCompressed(l2Offset: number, index: number, host: number): void {
    const entryAt = l2Offset + index * this.#h.l2EntrySize;
    if (this.#hasDataFile) {
      throw corrupt(
        this.#where,
        'L2 entry',
        `L2 entry ${index} of the table at ${hex(l2Offset)}: compressed cluster in an image with an external data file`,
        entryAt,
      );
    }
    if (host < this.#clusterSize || host >= this.#file.size) {
      throw corrupt(
        this.#where,
        'L2 entry',
        `L2 entry ${index} of the table at ${hex(l2Offset)}: compressed cluster descriptor points to ${hex(host)}, outside the file (${this.#file.size} bytes) or in the header`,
        entryAt,
      );
    }
  }

  #invalidBitmap(l2Offset: number, index: number, why: string): never {
    throw corrupt(
      this.#where,
      'L2 entry',
      `L2 entry ${index} of the table at ${hex(l2Offset)}: invalid subcluster bitmap: ${why}`,
      l2Offset + index * this.#h.l2EntrySize + 8,
    );
  }
}
