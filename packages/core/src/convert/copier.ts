/**
 * One worker's copy of one chunk: its preallocated buffer, the read, and the one write
 * path for the chunk's pieces (data, zeroes, skipped zeroes, and with -B what differs
 * from the backing image), with the copy's byte counts kept here and nowhere else.
 */
import type { BlockBackend, PipeRequest } from '../types.js';
import { ZeroScanner, isZero, sameBytes } from '../zeroscan.js';
import { piecesAroundHoles } from '../pieces.js';
import { holeList, type Chunk } from './cursor.js';
import { MAX_MERGED_HOLES } from './options.js';
import type { ConvertPlan } from './plan.js';

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
    if (!this.#failed) { this.#failed = true; this.#error = err; }
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
  readonly #target: BlockBackend;
  readonly #stats: CopyStats;
  /** A buffer of zeroes shared by the workers (read only), for targets that cannot writeZeroes and -S 0. */
  readonly #zeroes: () => Uint8Array;
  /** Lets the next chunk issue its writes (the write order); a no-op out of order. */
  readonly #releaseOrder: (seq: number) => void;
  readonly #buffer: Uint8Array;
  /** -B: the backing image's bytes of the chunk. */
  readonly #theirs?: Uint8Array;
  readonly #scanner?: ZeroScanner;
  readonly #batch = new WriteBatch();
  /** The holes of this worker's chunk (ChunkCursor.next fills them). */
  readonly holes = holeList();
  /** readSegments triples for a chunk's data pieces between its holes. */
  readonly #pieces = new Float64Array(3 * (MAX_MERGED_HOLES + 1));
  /** Data segments the last scan found (0 without a scan). */
  #segments = 0;
  #releasedSeq = -1;
  readonly #offload: CopyOffload;
  /** read() left the chunk to be copied by the storage: write() offloads it. */
  #offloading = false;
  /** The fused copy's request (plan.pipe), this worker's buffer and lists in it. */
  readonly #pipe?: PipeRequest;
  /** read() left the chunk to the pair's fused copy: write() pipes it. */
  #piping = false;
  /** The chunk being piped, for the request's issued(). */
  #pipeSeq = -1;

  constructor(plan: ConvertPlan, stats: CopyStats, zeroes: () => Uint8Array, releaseOrder: (seq: number) => void, offload: CopyOffload) {
    this.#plan = plan;
    this.#offload = offload;
    this.#target = plan.target;
    this.#stats = stats;
    this.#zeroes = zeroes;
    this.#releaseOrder = releaseOrder;
    this.#buffer = plan.allocate(plan.bufferSize);
    this.#theirs = plan.backing ? plan.allocate(plan.bufferSize) : undefined;
    this.#scanner = !plan.scan ? undefined : new ZeroScanner(this.#buffer, plan.unit, Math.max(plan.minSparse, plan.unit));
    if (plan.pipe) {
      this.#pipe = {
        buffer: this.#buffer, holes: this.holes, holeCount: 0, pieces: this.#pieces, unit: plan.unit,
        minRun: plan.scan ? Math.max(plan.minSparse, plan.unit) : 0,
        runs: new Float64Array(2 * (Math.ceil(plan.bufferSize / plan.unit) + MAX_MERGED_HOLES + 1)),
        issued: () => this.#release(this.#pipeSeq),
      };
    }
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
   * Reads a data chunk into the buffer and finds its zero runs; with copy offload on
   * and a source that can, reads nothing: write() has the storage copy it. Nor with a
   * source that can pipe: write() has the pair read, scan and write it in one step.
   */
  async read(chunk: Chunk): Promise<void> {
    this.#offloading = this.#offload.enabled && chunk.source.copyTo !== undefined;
    this.#piping = !this.#offloading && this.#pipe !== undefined && chunk.source.pipeTo !== undefined;
    if (!this.#offloading && !this.#piping) await this.#read(chunk);
  }

  async #read(chunk: Chunk): Promise<void> {
    const { length, holeCount } = chunk;
    if (holeCount > 0) {
      await this.#readAround(chunk, holeCount);
    } else {
      const data = await chunk.source.read(chunk.sourceOffset, length, this.#buffer);
      if (data.buffer !== this.#buffer.buffer || data.byteOffset !== this.#buffer.byteOffset) this.#buffer.set(data.subarray(0, length));
    }
    this.#stats.bytesRead += length;
    // Holes are merged only when there is a scan (-S > 0), so a chunk with holes has one.
    this.#segments = this.#scanner ? this.#scanner.scan(length, this.holes, holeCount) : 0;
  }

  /**
   * Reads only the data pieces of a chunk with merged holes, in one vectored request:
   * reading the holes would copy zeroes the zero scan then has to find again. The
   * holes' bytes in the buffer are left as they were, unless something reads the
   * whole buffer (a checksum, -B's comparison): then they are zeroed.
   */
  async #readAround(chunk: Chunk, holes: number): Promise<void> {
    const pairs = this.holes;
    const n = piecesAroundHoles(chunk.sourceOffset, chunk.length, pairs, holes, this.#pieces);
    await chunk.source.readSegments!(this.#buffer, this.#pieces, n);
    if (this.#plan.checksum || this.#theirs) {
      for (let h = 0; h < holes; h++) this.#buffer.fill(0, pairs[2 * h]!, pairs[2 * h + 1]!);
    }
  }

  /**
   * Writes the chunk (read already, when data): issues every write, lets the next chunk
   * issue its own, then waits for these to land.
   */
  async write(chunk: Chunk): Promise<void> {
    const { length, targetOffset, seq } = chunk;
    const target = this.#target;
    const scanner = this.#scanner;
    const flags = this.#plan.writeFlags;
    const skipZeroes = this.skipsZeroes(chunk);
    let written = 0;
    if (chunk.kind === 'data' && this.#offloading) {
      this.#offloading = false;
      if (await this.#copyOffloaded(chunk)) return;
      // Declined: off for the whole job, and this chunk is read and written after all.
      this.#offload.enabled = false;
      await this.#read(chunk);
    }
    if (chunk.kind === 'data' && this.#piping) {
      this.#piping = false;
      if (await this.#piped(chunk, skipZeroes)) return;
      // Declined (a range the pair cannot take as it is): read and write this chunk.
      await this.#read(chunk);
    }
    if (this.#theirs) {
      // -B reads the backing image first; its writes go out in turn, one chunk at a time.
      await this.#writeDifferences(targetOffset, length, chunk.kind === 'data' ? this.#buffer : undefined, this.#theirs);
    } else if (chunk.kind === 'zero') {
      if (skipZeroes) this.#stats.bytesSkipped += length;
      else await this.#issue(this.#writeZeroes(targetOffset, length), seq);
    } else if (!scanner) {
      await this.#issue(target.write(targetOffset, this.#buffer.subarray(0, length), flags), seq);
      written = length;
    } else if (target.writeSegments && scanner.dataCount > 1 && !flags) {
      // Data split by zero runs: all of it in one vectored request, then the zeroes.
      await this.#issue(target.writeSegments(targetOffset, this.#buffer, scanner.dataSegments, scanner.dataCount), seq);
      for (let i = 0; i < this.#segments; i++) {
        const len = scanner.segments[2 * i + 1]! - scanner.segments[2 * i]!;
        if (!scanner.segmentIsZero[i]) written += len;
        else if (skipZeroes) this.#stats.bytesSkipped += len;
        else await this.#issue(this.#writeZeroes(targetOffset + scanner.segments[2 * i]!, len), seq);
      }
    } else {
      for (let i = 0; i < this.#segments; i++) {
        const start = scanner.segments[2 * i]!;
        const end = scanner.segments[2 * i + 1]!;
        if (!scanner.segmentIsZero[i]) {
          const piece = this.#segments === 1 ? this.#buffer.subarray(0, length) : this.#buffer.subarray(start, end);
          await this.#issue(target.write(targetOffset + start, piece, flags), seq);
          written += end - start;
        } else if (skipZeroes) {
          this.#stats.bytesSkipped += end - start;
        } else {
          await this.#issue(this.#writeZeroes(targetOffset + start, end - start), seq);
        }
      }
    }
    // Issued: the next chunk may issue its own while these are in flight.
    this.#release(seq);
    await this.#batch.settle();
    this.#stats.bytesWritten += written;
  }

  /**
   * Has the storage copy a data chunk: issued, then the next chunk may issue its own
   * (after it settles, on a target that takes one write at a time). False when the
   * pair declined.
   */
  async #copyOffloaded(chunk: Chunk): Promise<boolean> {
    const copy = chunk.source.copyTo!(chunk.sourceOffset, chunk.length, this.#target, chunk.targetOffset);
    if (this.#plan.serialized) await copy.catch(() => {});
    this.#release(chunk.seq);
    if (!(await copy)) return false;
    this.#stats.bytesRead += chunk.length;
    this.#stats.bytesWritten += chunk.length;
    this.#stats.bytesOffloaded += chunk.length;
    return true;
  }

  /**
   * Has the pair read, scan and write a data chunk in one step, then zeroes or skips
   * the zero runs it found, as write() does with its own scan's. The next chunk may
   * issue its writes once the target has started the step (request.issued); the zero
   * runs are known only when it ends, so their writes follow later chunks' data. False
   * when declined: nothing was written, and the turn is still this chunk's.
   */
  async #piped(chunk: Chunk, skipZeroes: boolean): Promise<boolean> {
    const { length, targetOffset, seq } = chunk;
    const request = this.#pipe!;
    request.holeCount = chunk.holeCount;
    this.#pipeSeq = seq;
    const count = await chunk.source.pipeTo!(chunk.sourceOffset, length, this.#target, targetOffset, request);
    if (count < 0) return false;
    // A driver that never called issued(): the step is over, so the turn passes now.
    this.#release(seq);
    this.#stats.bytesRead += length;
    const runs = request.runs;
    let zeroes = 0;
    for (let i = 0; i < count; i++) {
      const start = runs[2 * i]!;
      const len = runs[2 * i + 1]! - start;
      zeroes += len;
      if (skipZeroes) this.#stats.bytesSkipped += len;
      else this.#batch.add(this.#writeZeroes(targetOffset + start, len));
    }
    await this.#batch.settle();
    this.#stats.bytesWritten += length - zeroes;
    return true;
  }

  /** Lets the next chunk write (once per chunk: a second release would move the turn back). */
  #release(seq: number): void {
    if (this.#releasedSeq !== seq) { this.#releasedSeq = seq; this.#releaseOrder(seq); }
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

  /** Zeroes a range of the target (the request gate splits it to the target's limits). */
  async #writeZeroes(offset: number, length: number): Promise<void> {
    if (this.#plan.allData || !this.#target.canWriteZeroes) {
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
  async #writeDifferences(offset: number, length: number, data: Uint8Array | undefined, theirs: Uint8Array): Promise<void> {
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
      const kind = (ours ? sameBytes(ours, theirs.subarray(at, at + n)) : isZero(theirs.subarray(at, at + n))) ? 'same'
        : !ours || isZero(ours) ? 'zero' : 'data';
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
