/**
 * One worker's copy of one chunk: its preallocated buffer and lists, and every way a
 * chunk reaches the target, with the copy's byte counts kept here and nowhere else.
 *
 * A chunk's way is decided once, when it is handed out (modeOf), and passed from the
 * read to the write:
 * - 'zero': known zeroes; written as zeroes, or skipped on a target that reads them back;
 * - 'copy': the source and target copy it in a step of their own (copyTo/copyFrom: an
 *   offload, -C, or a fused read-scan-write); when the pair declines, the chunk goes the
 *   'data' way after all;
 * - 'data': read into the buffer, scanned for zero runs, its data written (vectored when
 *   the target can), its zero runs zeroed or skipped;
 * - 'diff' (-B): read, compared with the backing image, only what differs written.
 */
import type { CopyRequest, GatedBackend } from '../types.js';
import { ZeroScanner, isZero, sameBytes } from '../zeroscan.js';
import { SegmentList, piecesAroundHoles } from '../segments.js';
import { holeList, type Chunk } from './cursor.js';
import { MAX_MERGED_HOLES } from './options.js';
import type { ConvertPlan } from './plan.js';

/** How one chunk is copied; see the head of this file. */
export type ChunkMode = 'zero' | 'copy' | 'data' | 'diff';

/** Bytes moved so far, for progress and the result. */
export class CopyStats {
  /** Bytes of the target covered (read, written, zeroed or skipped). */
  done = 0;
  bytesRead = 0;
  bytesWritten = 0;
  bytesZeroed = 0;
  bytesSkipped = 0;
  /** Bytes the storage copied itself (-C), counted in bytesRead and bytesWritten too. */
  bytesOffloaded = 0;
}

/**
 * Copy offload for a job (-C), shared by its workers: on while the pairs met so far
 * accept it; the first one that declines turns it off, as qemu-img does, and every
 * chunk from then on is read and written.
 */
export class CopyOffload {
  constructor(public enabled: boolean) {}
}

/**
 * A chunk's writes, in flight together: `add` issues, `settle` waits for all and throws
 * the first error. The catch handler is attached at once, so a write that fails while an
 * earlier one is still pending is never an unhandled rejection.
 */
class WriteBatch {
  readonly #pending: Array<Promise<unknown>> = [];
  #failed = false;
  #error: unknown;
  readonly #onError = (err: unknown): void => {
    if (!this.#failed) {
      this.#failed = true;
      this.#error = err;
    }
  };

  add(write: Promise<unknown>): void {
    this.#pending.push(write.catch(this.#onError));
  }

  async settle(): Promise<void> {
    if (this.#pending.length === 1) await this.#pending[0];
    else if (this.#pending.length > 1) await Promise.all(this.#pending);
    this.#pending.length = 0;
    if (this.#failed) {
      const err = this.#error;
      this.#failed = false;
      this.#error = undefined;
      throw err;
    }
  }
}

export class ChunkCopier {
  readonly #plan: ConvertPlan;
  readonly #target: GatedBackend;
  readonly #stats: CopyStats;
  /** A buffer of zeroes shared by the workers (read only), for -S 0. */
  readonly #zeroes: () => Uint8Array;
  /** Lets the next chunk issue its writes (the write order); a no-op out of order. */
  readonly #releaseOrder: (seq: number) => void;
  readonly #buffer: Uint8Array;
  /** -B: the backing image's bytes of the chunk. */
  readonly #theirs?: Uint8Array;
  readonly #scanner?: ZeroScanner;
  readonly #batch = new WriteBatch();
  /** The holes of this worker's chunk (ChunkCursor.next fills them). */
  readonly holes: SegmentList = holeList();
  /** readSegments pieces for a chunk's data between its holes. */
  readonly #pieces = new SegmentList(MAX_MERGED_HOLES + 1);
  #releasedSeq = -1;
  readonly #offload: CopyOffload;
  /** The copy step's request (offload or fused copy): this worker's buffer and lists in it. */
  readonly #request: CopyRequest & { offload: boolean };
  /** The chunk whose copy step is under way, for the request's issued(). */
  #copySeq = -1;

  constructor(
    plan: ConvertPlan,
    stats: CopyStats,
    zeroes: () => Uint8Array,
    releaseOrder: (seq: number) => void,
    offload: CopyOffload,
  ) {
    this.#plan = plan;
    this.#offload = offload;
    this.#target = plan.target;
    this.#stats = stats;
    this.#zeroes = zeroes;
    this.#releaseOrder = releaseOrder;
    this.#buffer = plan.allocate(plan.bufferSize);
    this.#theirs = plan.backing ? plan.allocate(plan.bufferSize) : undefined;
    this.#scanner = !plan.scan
      ? undefined
      : new ZeroScanner(this.#buffer, plan.unit, Math.max(plan.minSparse, plan.unit));
    this.#request = {
      offload: false,
      buffer: this.#buffer,
      holes: this.holes,
      pieces: this.#pieces,
      unit: plan.unit,
      minRun: plan.scan ? Math.max(plan.minSparse, plan.unit) : 0,
      zeroRuns: new SegmentList(plan.pipe ? Math.ceil(plan.bufferSize / plan.unit) + MAX_MERGED_HOLES + 1 : 0),
      // A target that takes one write at a time gets the next chunk's once this one is done.
      issued: () => {
        if (!plan.serialized) this.#release(this.#copySeq);
      },
    };
  }

  /** How this chunk goes, decided once (see the head of this file). */
  modeOf(chunk: Chunk): ChunkMode {
    if (chunk.kind === 'zero') return this.#theirs ? 'diff' : 'zero';
    if (this.#theirs) return 'diff';
    if (chunk.source.copyTo !== undefined && (this.#offload.enabled || this.#plan.pipe)) return 'copy';
    return 'data';
  }

  /** Zeroes of this chunk are left alone: the target reads them back as zeroes. */
  skipsZeroes(chunk: Chunk): boolean {
    return this.#plan.targetZero && chunk.targetOffset >= this.#plan.rewriteEnd;
  }

  /** The first `length` bytes of the buffer: the chunk just read. */
  bytes(length: number): Uint8Array {
    return this.#buffer.subarray(0, length);
  }

  /**
   * The read half: a 'data' or 'diff' chunk is read into the buffer (and a 'data' one
   * scanned); a 'copy' chunk is read by the copy step, at write time; a 'zero' one not at all.
   */
  async read(chunk: Chunk, mode: ChunkMode): Promise<void> {
    if (mode === 'data' || (mode === 'diff' && chunk.kind === 'data')) await this.#readData(chunk);
  }

  /**
   * The write half: issues every write of the chunk, lets the next chunk issue its own,
   * then waits for these to land.
   */
  async write(chunk: Chunk, mode: ChunkMode): Promise<void> {
    if (mode === 'copy') {
      if (await this.#copyStep(chunk)) return;
      // Declined: an offload is off for the whole job; either way this chunk is read and written.
      if (this.#request.offload) this.#offload.enabled = false;
      await this.#readData(chunk);
      mode = 'data';
    }
    if (mode === 'diff') {
      // -B reads the backing image first; its writes go out in turn, one chunk at a time.
      await this.#writeDifferences(
        chunk.targetOffset,
        chunk.length,
        chunk.kind === 'data' ? this.#buffer : undefined,
        this.#theirs!,
      );
    } else if (mode === 'zero') {
      await this.#zeroOrSkip(chunk, chunk.targetOffset, chunk.length);
    } else {
      await this.#writeData(chunk);
    }
    // Issued: the next chunk may issue its own while these are in flight.
    this.#release(chunk.seq);
    await this.#batch.settle();
  }

  /** Reads a data chunk into the buffer and, with a scan, finds its zero runs. */
  async #readData(chunk: Chunk): Promise<void> {
    const { length } = chunk;
    if (this.holes.count > 0) {
      await this.#readAround(chunk);
    } else {
      const data = await chunk.source.read(chunk.sourceOffset, length, this.#buffer);
      if (data.buffer !== this.#buffer.buffer || data.byteOffset !== this.#buffer.byteOffset)
        this.#buffer.set(data.subarray(0, length));
    }
    this.#stats.bytesRead += length;
    // Holes are merged only when there is a scan (-S > 0), so a chunk with holes has one.
    this.#scanner?.scan(length, chunk.targetOffset, this.holes);
  }

  /**
   * Reads only the data pieces of a chunk with merged holes, in one vectored request:
   * reading the holes would copy zeroes the zero scan then has to find again. The
   * holes' bytes in the buffer are left as they were, unless something reads the
   * whole buffer (a checksum, -B's comparison): then they are zeroed.
   */
  async #readAround(chunk: Chunk): Promise<void> {
    const holes = this.holes;
    piecesAroundHoles(chunk.sourceOffset, chunk.length, holes, this.#pieces);
    await chunk.source.readSegments!(this.#buffer, this.#pieces);
    if (this.#plan.checksum || this.#theirs) {
      for (let h = 0; h < holes.count; h++)
        this.#buffer.fill(0, holes.positionAt(h), holes.positionAt(h) + holes.lengthAt(h));
    }
  }

  /**
   * A 'data' chunk's writes: without a scan the buffer whole; with one, its data
   * segments (in one vectored request where the target takes it) and its zero runs.
   */
  async #writeData(chunk: Chunk): Promise<void> {
    const target = this.#target;
    const flags = this.#plan.writeFlags;
    const scanner = this.#scanner;
    const seq = chunk.seq;
    if (!scanner) {
      await this.#issue(target.write(chunk.targetOffset, this.#buffer.subarray(0, chunk.length), flags), seq);
      this.#stats.bytesWritten += chunk.length;
    } else {
      const data = scanner.data;
      if (target.writeSegments && data.count > 1 && !flags) {
        await this.#issue(target.writeSegments(this.#buffer, data), seq);
      } else {
        for (let i = 0; i < data.count; i++) {
          const pos = data.positionAt(i);
          await this.#issue(
            target.write(data.offsetAt(i), this.#buffer.subarray(pos, pos + data.lengthAt(i)), flags),
            seq,
          );
        }
      }
      this.#stats.bytesWritten += data.totalLength();
      const zeroes = scanner.zeroes;
      for (let i = 0; i < zeroes.count; i++) await this.#zeroOrSkip(chunk, zeroes.offsetAt(i), zeroes.lengthAt(i));
    }
  }

  /**
   * Has the source and target copy a data chunk in a step of their own (an offload, or a
   * fused read-scan-write whose zero runs then are zeroed or skipped here). The next
   * chunk may issue its writes once the target has started the step (request.issued); a
   * fused copy's zero runs are known only when it ends, so their writes follow later
   * chunks' data. False when declined: nothing was written, and the turn is still this
   * chunk's.
   */
  async #copyStep(chunk: Chunk): Promise<boolean> {
    const request = this.#request;
    request.offload = this.#offload.enabled;
    request.zeroRuns.clear();
    this.#copySeq = chunk.seq;
    const copied = await chunk.source.copyTo!(
      chunk.sourceOffset,
      chunk.length,
      this.#target,
      chunk.targetOffset,
      request,
    );
    if (!copied) return false;
    // A driver that never called issued(), or a one-at-a-time target: the step is over, so the turn passes now.
    this.#release(chunk.seq);
    this.#stats.bytesRead += chunk.length;
    if (request.offload) {
      this.#stats.bytesWritten += chunk.length;
      this.#stats.bytesOffloaded += chunk.length;
      return true;
    }
    const runs = request.zeroRuns;
    for (let i = 0; i < runs.count; i++) await this.#zeroOrSkip(chunk, runs.offsetAt(i), runs.lengthAt(i));
    await this.#batch.settle();
    this.#stats.bytesWritten += chunk.length - runs.totalLength();
    return true;
  }

  /** Lets the next chunk write (once per chunk: a second release would move the turn back). */
  #release(seq: number): void {
    if (this.#releasedSeq !== seq) {
      this.#releasedSeq = seq;
      this.#releaseOrder(seq);
    }
  }

  /**
   * Issues one write of the chunk. A chunk's writes go out together, except to a target
   * that takes one at a time, and compressed ones: each of those holds a compression
   * buffer and a codec thread, and a chunk's dozens at once took RSS from 110 to 275 MiB;
   * there the next chunk may start once this one's first write is out.
   */
  #issue(write: Promise<unknown>, seq: number): Promise<void> | undefined {
    this.#batch.add(write);
    if (!this.#plan.pieceByPiece) return undefined;
    if (!this.#plan.serialized) this.#release(seq);
    return this.#batch.settle();
  }

  /** A zero range of the chunk: skipped on a target that reads back zeroes, else zeroed. */
  #zeroOrSkip(chunk: Chunk, offset: number, length: number): Promise<void> | undefined {
    if (this.skipsZeroes(chunk)) {
      this.#stats.bytesSkipped += length;
      return undefined;
    }
    return this.#issue(this.#writeZeroes(offset, length), chunk.seq);
  }

  /** Zeroes a range of the target (the request gate splits it to the target's limits). */
  async #writeZeroes(offset: number, length: number): Promise<void> {
    if (this.#plan.allData || !this.#target.canZero) {
      const buf = this.#zeroes();
      for (let done = 0; done < length; done += buf.length) {
        const n = Math.min(buf.length, length - done);
        await this.#target.write(offset + done, n === buf.length ? buf : buf.subarray(0, n));
        this.#stats.bytesWritten += n;
      }
      return;
    }
    await this.#target.writeZeroes(offset, length, { mayUnmap: true });
    this.#stats.bytesZeroed += length;
  }

  /**
   * -B: writes the units of [offset, +length) whose contents (`data`, or zeroes when
   * absent) differ from the backing image's, read into `theirs`.
   */
  async #writeDifferences(
    offset: number,
    length: number,
    data: Uint8Array | undefined,
    theirs: Uint8Array,
  ): Promise<void> {
    const backing = this.#plan.backing!;
    const unit = this.#plan.unit;
    const avail = Math.max(0, Math.min(length, backing.size - offset));
    if (avail > 0) await backing.read(offset, avail, theirs);
    theirs.fill(0, avail, length);
    let runStart = 0;
    let runKind: 'same' | 'zero' | 'data' = 'same';
    const flushRun = async (end: number): Promise<void> => {
      if (end === runStart || runKind === 'same') return;
      if (runKind === 'data') {
        await this.#target.write(offset + runStart, data!.subarray(runStart, end), this.#plan.writeFlags);
        this.#stats.bytesWritten += end - runStart;
      } else {
        await this.#writeZeroes(offset + runStart, end - runStart);
      }
    };
    for (let at = 0; at < length; at += unit) {
      const n = Math.min(unit, length - at);
      const ours = data?.subarray(at, at + n);
      const kind = (ours ? sameBytes(ours, theirs.subarray(at, at + n)) : isZero(theirs.subarray(at, at + n)))
        ? 'same'
        : !ours || isZero(ours)
          ? 'zero'
          : 'data';
      if (kind !== runKind) {
        await flushRun(at);
        runStart = at;
        runKind = kind;
      }
      if (kind === 'same') this.#stats.bytesSkipped += n;
    }
    await flushRun(length);
  }
}
