/**
 * An opened qcow2 image (read side). read() walks the cluster map run by run: each
 * run of host-contiguous data becomes one read of the protocol backend straight into
 * the caller's buffer, zero runs are filled in place, unallocated runs read through
 * to the backing image (zeroes past its end), and compressed clusters that sit next
 * to each other in the file are fetched with one read and decompressed in parallel.
 * All parts of one request run concurrently; the request settles only when every
 * part has, so nothing writes into the caller's buffer after it returns.
 */
import {
  BlockError,
  roundDown,
  ungated,
  type BackendIdentity,
  type BlockBackend,
  type BlockLimits,
  type Extent,
  type CopyRequest,
  type GatedBackend,
  SegmentList,
  type WriteFlags,
  type WriteZeroesFlags,
} from '@blockconv/core';
import type { TableCache } from './cache.js';
import { readCompressedGroup } from './compression.js';
import { INCOMPAT_CORRUPT, type Qcow2Header } from './header.js';
import { buildInfo, readBitmapList } from './info.js';
import { KIND_COMPRESSED, KIND_DATA, KIND_UNALLOCATED, KIND_ZERO, newRun, type ClusterMapper } from './mapping.js';
import type { Snapshot } from './snapshots.js';
import { Qcow2Writer, type WriterParams } from './writer.js';

const MiB = 1024 * 1024;
const MAX_TRANSFER = 64 * MiB;
/** Largest single read of neighbouring compressed clusters. */
const MAX_COMPRESSED_GROUP = 1 * MiB;
/** L2 tables block status may read beyond the first to make one extent longer. */
const STATUS_LOAD_BUDGET = 4;

export interface Qcow2Parts {
  readonly file: GatedBackend;
  readonly header: Qcow2Header;
  readonly mapper: ClusterMapper;
  readonly cache: TableCache;
  readonly dataFile?: GatedBackend;
  readonly backing?: GatedBackend;
  /** The backing file name resolved against the image's location. */
  readonly fullBackingFilename?: string;
  readonly snapshots: readonly Snapshot[];
  /** The snapshot being read instead of the active L1 table. */
  readonly snapshot?: Snapshot;
  readonly warnings: readonly string[];
  /** Present when the image is opened for writing. */
  readonly write?: Omit<WriterParams, 'readGuest' | 'allocBuffer'>;
}

/** One group of compressed clusters fetched with a single read. */
interface CompressedGroup {
  start: number;
  end: number;
  items: Array<{ host: number; guest: number; inCluster: number; outAt: number; length: number }>;
}

export class Qcow2Backend implements BlockBackend {
  readonly driverName = 'qcow2';
  readonly location: string;
  readonly size: number;
  readonly readOnly: boolean;
  readonly readOnlyReason?: string;
  readonly limits: BlockLimits;
  readonly canZero: boolean;
  readonly canDiscard: boolean;
  readonly zeroInitialized: boolean;
  readonly canCompress: boolean;
  readonly canBlockStatus = true;
  readonly canReadHolesCheaply: boolean;
  /** Concurrent writes are ordered per cluster by the writer. */
  readonly canWriteOutOfOrder = true;
  readonly backing?: BlockBackend;
  readonly allocBuffer?: (size: number) => Uint8Array;
  readonly header: Qcow2Header;
  /** Conditions worth telling the user that did not prevent opening (e.g. the corrupt bit). */
  readonly warnings: readonly string[];
  readonly snapshots: readonly Snapshot[];
  readonly snapshot?: Snapshot;

  readonly #p: Qcow2Parts;
  readonly #file: GatedBackend;
  /** Where data clusters live: the external data file, or the image file. */
  readonly #data: GatedBackend;
  readonly #mapper: ClusterMapper;
  readonly #clusterSize: number;
  readonly #writer?: Qcow2Writer;
  #closed = false;

  constructor(p: Qcow2Parts) {
    this.#p = p;
    this.#file = p.file;
    this.#data = p.dataFile ?? p.file;
    this.#mapper = p.mapper;
    this.#clusterSize = p.header.clusterSize;
    this.header = p.header;
    this.location = p.file.location;
    this.size = p.header.size;
    this.backing = p.backing;
    this.warnings = p.warnings;
    this.snapshots = p.snapshots;
    this.snapshot = p.snapshot;
    // Requests the core sends are aligned for every backend below, so that data
    // runs (cluster-aligned in the host) go straight through; finer runs bounce.
    const below = [p.file, p.dataFile, p.backing].filter((b): b is GatedBackend => b !== undefined);
    const align = Math.max(1, ...below.map((b) => b.limits.requestAlignment));
    const memAlign = Math.max(1, ...below.map((b) => b.limits.minMemAlignment ?? 1));
    const maxTransfer = Math.max(align, roundDown(MAX_TRANSFER, align));
    this.limits = {
      requestAlignment: align,
      maxTransfer,
      optimalTransfer: Math.min(maxTransfer, Math.max(align, p.header.clusterSize, p.file.limits.optimalTransfer ?? 0)),
      minMemAlignment: memAlign,
      // Whole clusters (subclusters with extended L2) need no copy-on-write.
      preferredAlignment: Math.max(align, p.header.subclusterSize),
      compressionUnit: p.header.clusterSize,
    };
    const owner = below.find((b) => b.allocBuffer && (b.limits.minMemAlignment ?? 1) === memAlign);
    if (memAlign > 1 && owner) this.allocBuffer = owner.allocBuffer!.bind(owner);
    this.readOnly = p.write === undefined;
    if ((p.header.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n)
      this.readOnlyReason = 'the image is marked corrupt; writing is refused';
    this.canZero = p.write !== undefined && (p.header.version === 3 || !p.backing);
    this.canDiscard = p.write !== undefined;
    this.canCompress = p.write !== undefined;
    // Unknown for an existing image; the registry sets it on one create() just made.
    this.zeroInitialized = false;
    if (p.write) {
      this.#writer = new Qcow2Writer({
        ...p.write,
        readGuest: (offset, length, into) => this.read(offset, length, into),
        allocBuffer: (n) => this.#buffer(n),
      });
    }
    // Zero and unallocated ranges are filled here without I/O, unless a backing file must be read.
    this.canReadHolesCheaply = p.backing ? p.backing.canReadHolesCheaply === true : true;
  }

  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    const out = into ? into.subarray(0, length) : this.#buffer(length);
    await this.#readRanges(out, Float64Array.of(offset, length, 0), 1, 'read');
    return out;
  }

  /**
   * Guest ranges into one buffer (convert reads a chunk's data pieces around its holes
   * so): every range's host data runs go to the file below as one vectored request.
   */
  async readSegments(into: Uint8Array, segments: SegmentList): Promise<void> {
    if (segments.count > 0) await this.#readRanges(into, segments.array, segments.count, 'readSegments');
  }

  /** Walks the cluster map over (guest offset, length, buffer position) triples. */
  async #readRanges(out: Uint8Array, ranges: Float64Array, count: number, op: string): Promise<void> {
    // Parts run while later runs are looked up: each gets its rejection handler at once
    // (an await in between would leave it unhandled), and the first error is kept.
    const tasks: Array<Promise<void>> = [];
    let failure: unknown;
    const track = (part: Promise<void>): void => {
      tasks.push(
        part.catch((err: unknown) => {
          failure ??= err;
        }),
      );
    };
    // Data runs of a file that takes scattered reads go in one request at the end.
    const data = this.#data;
    const vectored =
      data.readSegments && data.limits.requestAlignment === 1 && (data.limits.minMemAlignment ?? 1) === 1;
    const scattered: number[] = [];
    try {
      const run = newRun();
      let group: CompressedGroup | undefined;
      for (let r = 0; r < count; r++) {
        const offset = ranges[3 * r]!;
        const end = offset + ranges[3 * r + 1]!;
        const base = ranges[3 * r + 2]! - offset;
        for (let pos = offset; pos < end; ) {
          const pending = this.#mapper.lookup(pos, end - pos, run);
          if (pending) await pending;
          const at = base + pos;
          const n = run.length;
          if (run.kind !== KIND_COMPRESSED && group) {
            track(this.#readCompressed(group, out));
            group = undefined;
          }
          switch (run.kind) {
            case KIND_DATA:
              if (vectored) {
                const avail = Math.max(0, Math.min(n, data.size - run.host));
                // Pieces respect the data file's maxTransfer, as readSegments requires.
                for (let done = 0; done < avail; done += data.limits.maxTransfer) {
                  scattered.push(run.host + done, Math.min(data.limits.maxTransfer, avail - done), at + done);
                }
                if (avail < n) out.fill(0, at + avail, at + n);
              } else {
                track(this.#readData(run.host, out.subarray(at, at + n)));
              }
              break;
            case KIND_ZERO:
              out.fill(0, at, at + n);
              break;
            case KIND_UNALLOCATED:
              if (this.backing) track(this.#readBacking(pos, out.subarray(at, at + n)));
              else out.fill(0, at, at + n);
              break;
            case KIND_COMPRESSED: {
              const inCluster = pos % this.#clusterSize;
              const cEnd = Math.min(run.host + run.csize, this.#file.size);
              const item = { host: run.host, guest: pos - inCluster, inCluster, outAt: at, length: n };
              if (
                group &&
                run.host >= group.start &&
                run.host <= group.end &&
                Math.max(cEnd, group.end) - group.start <= MAX_COMPRESSED_GROUP
              ) {
                group.end = Math.max(group.end, cEnd);
                group.items.push(item);
              } else {
                if (group) track(this.#readCompressed(group, out));
                group = { start: run.host, end: cEnd, items: [item] };
              }
              break;
            }
          }
          pos += n;
        }
      }
      if (group) track(this.#readCompressed(group, out));
      if (scattered.length)
        track(data.readSegments!(out, new SegmentList(Float64Array.from(scattered), scattered.length / 3)));
    } catch (err) {
      failure ??= err;
    }
    // Every part must settle before returning: the caller reuses `out` right after.
    await Promise.all(tasks);
    if (failure !== undefined) {
      const first = ranges[0]!;
      const last = ranges[3 * (count - 1)]! + ranges[3 * (count - 1) + 1]!;
      throw this.#contextual(failure, op, first, last - first);
    }
  }

  /**
   * A fused copy of a data chunk (see BlockBackend.copyTo): the host runs of its data
   * clusters become the pieces a target reads from the file below, zero clusters are
   * zeroed in the buffer here. Declined for offloads (a zero cluster has no bytes to
   * copy), and where bytes need this driver on the way (compressed clusters, a backing
   * file's, a file that needs aligned requests) or the runs do not fit the request's list.
   */
  async copyTo(
    offset: number,
    length: number,
    target: BlockBackend,
    targetOffset: number,
    request: CopyRequest,
  ): Promise<boolean> {
    const data = this.#data;
    if (
      request.offload ||
      !target.copyFrom ||
      data.limits.requestAlignment !== 1 ||
      (data.limits.minMemAlignment ?? 1) !== 1
    )
      return false;
    const { holes, pieces, buffer } = request;
    const holeCount = holes.count;
    const room = pieces.capacity;
    pieces.clear();
    const run = newRun();
    let pos = 0;
    try {
      for (let h = 0; h <= holeCount; h++) {
        const end = h < holeCount ? holes.positionAt(h) : length;
        while (pos < end) {
          const pending = this.#mapper.lookup(offset + pos, end - pos, run);
          if (pending) await pending;
          const len = run.length;
          if (run.kind === KIND_DATA) {
            const avail = Math.max(0, Math.min(len, data.size - run.host));
            if (avail > 0) {
              // Host-contiguous with the run before: one piece.
              const joins =
                pieces.count > 0 &&
                pieces.endAt(pieces.count - 1) === run.host &&
                pieces.positionAt(pieces.count - 1) + pieces.lengthAt(pieces.count - 1) === pos;
              if (!joins && pieces.count === room) return false;
              pieces.append(run.host, avail, pos);
            }
            if (avail < len) buffer.fill(0, pos + avail, pos + len);
          } else if (run.kind === KIND_ZERO || (run.kind === KIND_UNALLOCATED && !this.backing)) {
            buffer.fill(0, pos, pos + len);
          } else {
            return false;
          }
          pos += len;
        }
        if (h < holeCount) pos = holes.positionAt(h) + holes.lengthAt(h);
      }
    } catch (err) {
      throw this.#contextual(err, 'read', offset, length);
    }
    return target.copyFrom(targetOffset, length, ungated(data), request);
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    // The length is only a hint: extents run as far as the cached tables (and a few more) tell.
    const run = newRun();
    try {
      const pending = this.#mapper.lookup(offset, this.size - offset, run, STATUS_LOAD_BUDGET, true);
      if (pending) await pending;
    } catch (err) {
      throw this.#contextual(err, 'blockStatus', offset, length);
    }
    switch (run.kind) {
      case KIND_DATA:
        return { kind: 'data', length: run.length, offset: run.host };
      case KIND_COMPRESSED:
        return { kind: 'data', length: run.length };
      case KIND_ZERO:
        return run.host >= 0
          ? { kind: 'zero', length: run.length, offset: run.host }
          : { kind: 'zero', length: run.length };
      default:
        return run.host >= 0
          ? { kind: 'unallocated', length: run.length, offset: run.host }
          : { kind: 'unallocated', length: run.length };
    }
  }

  async write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    try {
      if (flags?.compress) await this.#writable.writeCompressed(offset, data);
      else await this.#writable.write(offset, data);
      if (flags?.fua) await this.#writable.flush();
    } catch (err) {
      throw this.#contextual(err, 'write', offset, data.length);
    }
  }

  /** Data split by zero runs, in as few allocations and host requests as possible. */
  async writeSegments(from: Uint8Array, segments: SegmentList): Promise<void> {
    if (segments.count === 0) return;
    try {
      await this.#writable.writeSegments(from, segments);
    } catch (err) {
      throw this.#contextual(err, 'write', segments.offsetAt(0), segments.lengthAt(0));
    }
  }

  async writeZeroes(offset: number, length: number, flags?: WriteZeroesFlags): Promise<void> {
    try {
      await this.#writable.writeZeroes(offset, length, flags);
    } catch (err) {
      throw this.#contextual(err, 'writeZeroes', offset, length);
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    try {
      await this.#writable.discard(offset, length);
    } catch (err) {
      throw this.#contextual(err, 'discard', offset, length);
    }
  }

  async flush(): Promise<void> {
    if (!this.#writer) return;
    try {
      await this.#writer.flush();
    } catch (err) {
      throw this.#contextual(err, 'flush', 0, 0);
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    // The image's own metadata first: a failure there must not be hidden by the files closing.
    let failure: unknown;
    try {
      await this.#writer?.close();
    } catch (err) {
      failure = this.#contextual(err, 'close', 0, 0);
    }
    const parts = [this.backing, this.#p.dataFile, this.#file].filter((b): b is BlockBackend => b !== undefined);
    const results = await Promise.allSettled(parts.map((b) => b.close()));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failure !== undefined) throw failure;
    if (failed) throw failed.reason;
  }

  async info(): Promise<Record<string, unknown>> {
    const where = { location: this.location, op: 'info' };
    const bitmaps = await readBitmapList(this.header, (o, n) => this.#file.read(o, n, this.#buffer(n)), where);
    return buildInfo({
      header: this.header,
      snapshots: this.snapshots,
      bitmaps,
      fullBackingFilename: this.#p.fullBackingFilename,
    });
  }

  /** The image file's allocation, as qemu-img reports it (an external data file is not counted). */
  async allocatedSize(): Promise<number | undefined> {
    return this.#file.allocatedSize?.();
  }

  /** The image file's identity; the version also changes with the data file's or the backing chain's. */
  async identity(): Promise<BackendIdentity> {
    const file = await this.#file.identity?.();
    if (!file) return { id: this.location };
    const below = await Promise.all([this.#p.dataFile, this.backing].map((b) => b?.identity?.()));
    return {
      id: file.id,
      version: [file.version, ...below.map((i) => i && `${i.id}@${i.version ?? ''}`)].filter(Boolean).join(' '),
    };
  }

  /** L2 cache counters, for tests and tuning. */
  get cacheStats(): { hits: number; misses: number; tables: number; capacity: number } {
    const c = this.#p.cache;
    return { ...c.stats, tables: c.size, capacity: c.capacity };
  }

  // --- internals -----------------------------------------------------------------

  /** Data clusters; a cluster whose end lies past the end of the file reads zeroes there, as in QEMU. */
  async #readData(host: number, dest: Uint8Array): Promise<void> {
    const avail = Math.min(dest.length, this.#data.size - host);
    if (avail > 0) await this.#data.read(host, avail, dest.subarray(0, avail));
    if (avail < dest.length) dest.fill(0, Math.max(0, avail));
  }

  /** Unallocated ranges: the backing image's bytes, zeroes past its end. */
  async #readBacking(pos: number, dest: Uint8Array): Promise<void> {
    const backing = this.backing!;
    const avail = Math.max(0, Math.min(dest.length, backing.size - pos));
    if (avail > 0) await backing.read(pos, avail, dest.subarray(0, avail));
    if (avail < dest.length) dest.fill(0, avail);
  }

  async #readCompressed(group: CompressedGroup, out: Uint8Array): Promise<void> {
    await readCompressedGroup(this.#file, this.header.compressionType, this.#clusterSize, group, out);
  }

  #buffer(n: number): Uint8Array {
    return this.allocBuffer ? this.allocBuffer(n) : new Uint8Array(n);
  }

  /** The writer; the core's gate sends no change to a read-only image, so it is there. */
  get #writable(): Qcow2Writer {
    return this.#writer!;
  }

  /** Errors from below keep their own details; others get this image's. */
  #contextual(err: unknown, op: string, offset: number, length: number): BlockError {
    if (err instanceof BlockError) return err;
    return new BlockError('EIO', (err as Error)?.message ?? String(err), {
      op,
      location: this.location,
      offset,
      length,
      cause: err,
    });
  }
}
