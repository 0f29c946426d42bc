/**
 * The "file" protocol: local regular files and block devices, through plain fds.
 * Reads and writes use callback fs.read/fs.write (one thread-pool hop, no FileHandle
 * bookkeeping); what fs lacks (SEEK_DATA, fallocate, copy_file_range, block device
 * ioctls, aligned memory) comes from @blockconv/fileio. The core's request gate checks ranges, the
 * read-only and closed states and splits at maxTransfer, so none of that is done here.
 */
import * as fs from 'node:fs';
import { promisify } from 'node:util';
import {
  BLOCK_API_VERSION,
  BlockError,
  piecesAroundHoles,
  roundDown,
  roundUp,
  toBlockError,
  type BackendIdentity,
  type BlockBackend,
  type BlockLimits,
  type CreateOptions,
  type CreateResult,
  type Extent,
  type OpenOptions,
  type CopyRequest,
  type SegmentList,
  type ProtocolDriver,
  type WriteFlags,
  type WriteZeroesFlags,
} from '@blockconv/core';
import * as fileio from '@blockconv/fileio';
import { parseWriteBehindOption, writeBehindFor, type WriteBehind } from './write-behind.js';

/**
 * fileio.pipe's own lists for a copy request: holes and zero runs as [start, end) pairs
 * relative to the chunk, as the addon takes them. Made once per request (one per convert
 * worker) and reused from chunk to chunk.
 */
interface PipeLists {
  readonly chunk: fileio.PipeChunk & { holeCount: number };
  readonly runs: Float64Array;
}

const pipeListsOf = new WeakMap<CopyRequest, PipeLists>();

function pipeLists(request: CopyRequest): PipeLists {
  let lists = pipeListsOf.get(request);
  if (!lists) {
    const runs = new Float64Array(2 * request.zeroRuns.capacity);
    const chunk = {
      pieces: request.pieces.array,
      buffer: request.buffer,
      holes: new Float64Array(2 * request.holes.capacity),
      holeCount: 0,
      unit: request.unit,
      minRun: request.minRun,
      runs,
    };
    lists = { chunk, runs };
    pipeListsOf.set(request, lists);
  }
  const holes = request.holes;
  for (let i = 0; i < holes.count; i++) {
    lists.chunk.holes[2 * i] = holes.positionAt(i);
    lists.chunk.holes[2 * i + 1] = holes.positionAt(i) + holes.lengthAt(i);
  }
  lists.chunk.holeCount = holes.count;
  return lists;
}

const { O_RDONLY, O_RDWR, O_WRONLY, O_CREAT, O_TRUNC, O_DIRECT, O_DSYNC } = fs.constants;

const MiB = 1024 * 1024;
const MAX_TRANSFER = 64 * MiB;
const OPTIMAL_TRANSFER = 2 * MiB;
/** fallocate only touches metadata, so large zero requests are cheap on files. */
const MAX_ZEROES_FILE = 1024 * MiB;
/** BLKZEROOUT may really write; keep each call short enough to stay cancellable. */
const MAX_ZEROES_DEVICE = 64 * MiB;
/** Memory alignment for O_DIRECT: a page satisfies every device. */
const MEM_ALIGN = 4096;
/**
 * O_DIRECT request alignment for regular files. The real value (the underlying
 * device's logical block size) is not portably detectable; 4096 is safe everywhere.
 */
const FILE_DIRECT_ALIGN = 4096;
/** Size of the zero buffer used when a file system cannot zero ranges itself. */
const ZERO_CHUNK = 1 * MiB;
/** Extents fetched per block-status trip to the thread pool. */
const EXTENT_BATCH = 512;

const PUNCH = fileio.FALLOC_FL_PUNCH_HOLE | fileio.FALLOC_FL_KEEP_SIZE;
const ZERO_RANGE = fileio.FALLOC_FL_ZERO_RANGE | fileio.FALLOC_FL_KEEP_SIZE;

const openFd = promisify(fs.open);
const closeFd = promisify(fs.close);
const fstat = promisify(fs.fstat);
const stat = promisify(fs.stat);
const ftruncate = promisify(fs.ftruncate);
const fdatasync = promisify(fs.fdatasync);

function pread(fd: number, buf: Uint8Array, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, 0, buf.length, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function pwrite(fd: number, buf: Uint8Array, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, 0, buf.length, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function errCode(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** The file system or device lacks the operation for good (fileio says EOPNOTSUPP, fs ENOTSUP). */
function isUnsupported(err: unknown): boolean {
  const code = errCode(err);
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'ENOTTY';
}

/**
 * copy_file_range cannot do this pair: EXDEV (file systems of different types), EINVAL
 * (overlapping ranges of one file, O_DIRECT where the file system refuses it), and no
 * support at all. Anything else (ENOSPC, EIO) is a real failure of the copy.
 */
function cannotCopy(err: unknown): boolean {
  const code = errCode(err);
  return isUnsupported(err) || code === 'EXDEV' || code === 'EINVAL' || code === 'EBADF' || code === 'ETXTBSY';
}

interface FileParams {
  location: string;
  fd: number;
  /** Buffered fd on the same file for requests O_DIRECT cannot do; `fd` when not direct. */
  bufferedFd: number;
  size: number;
  readOnly: boolean;
  isDevice: boolean;
  direct: boolean;
  /** O_DSYNC is set: every write is already stable. */
  sync: boolean;
  /** cache=unsafe: flushes are skipped. */
  unsafe: boolean;
  /** Large writes are written behind (buffered, writable, on a disk). */
  writeBehind?: WriteBehind;
  /** Logical block size (devices) or FILE_DIRECT_ALIGN (files). */
  sectorSize: number;
}

export class FileBackend implements BlockBackend {
  readonly driverName = 'file';
  readonly location: string;
  readonly readOnly: boolean;
  readonly limits: BlockLimits;
  readonly canZero = true;
  readonly canDiscard = true;
  /**
   * Regular files zero with fallocate (punch, ZERO_RANGE): metadata only, or ENOTSUP
   * where the file system has neither. Devices may have to write (BLKZEROOUT): not fast.
   */
  readonly canFastZero: boolean;
  /** Unknown for an existing file; the registry sets it on one create() just made. */
  readonly zeroInitialized = false;
  readonly canCompress = false;
  readonly canBlockStatus: boolean;
  /** Holes of regular files read as zeroes filled by the kernel, without disk I/O. */
  readonly canReadHolesCheaply: boolean;
  readonly canWriteOutOfOrder = true;
  /** Present only with O_DIRECT, where the memory of I/O buffers must be aligned. */
  readonly allocBuffer?: (size: number) => Uint8Array;

  readonly #p: FileParams;
  /** Request alignment O_DIRECT needs; 1 for buffered I/O. */
  readonly #align: number;
  #closed = false;
  // Capabilities found missing, so later calls skip straight to the fallback.
  #noZeroRange = false;
  #noPunch = false;
  #noZeroOut = false;
  #noDiscard = false;
  /**
   * Extents read ahead by one native call ([length, isData] pairs from #extentsStart),
   * so that a walk over a fragmented file costs one thread-pool trip per batch.
   * Dropped by anything that changes allocation.
   */
  #extents: Float64Array | null = null;
  #extentsStart = 0;
  /** Index (pair) and start offset of the extent the last lookup found: walks are sequential. */
  #extentIndex = 0;
  #extentOffset = 0;
  #zeroBuf?: Uint8Array;
  /** Changes only through resize(). */
  #size: number;

  constructor(p: FileParams) {
    this.#p = p;
    this.location = p.location;
    this.#size = p.size;
    this.readOnly = p.readOnly;
    // Block devices have no holes to find; report them as all data.
    this.canBlockStatus = !p.isDevice;
    this.canFastZero = !p.isDevice;
    this.canReadHolesCheaply = !p.isDevice;
    this.#align = p.direct ? p.sectorSize : 1;
    this.limits = {
      requestAlignment: this.#align,
      maxTransfer: MAX_TRANSFER,
      optimalTransfer: OPTIMAL_TRANSFER,
      maxWriteZeroes: p.isDevice ? MAX_ZEROES_DEVICE : MAX_ZEROES_FILE,
      minMemAlignment: p.direct ? MEM_ALIGN : 1,
    };
    if (p.direct) this.allocBuffer = (size) => fileio.allocAligned(size, MEM_ALIGN);
  }

  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    const out = into
      ? into.subarray(0, length)
      : this.allocBuffer
        ? this.allocBuffer(length)
        : Buffer.allocUnsafeSlow(length);
    try {
      await this.#transfer(false, out, offset);
    } catch (err) {
      throw toBlockError(err, this.#where('read', offset, length));
    }
    return out;
  }

  async write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    this.#extents = null;
    try {
      await this.#transfer(true, data, offset);
      // Only a write that is written behind waits: no await (a microtask) per write otherwise.
      const behind = this.#p.writeBehind?.written(offset, data.length);
      if (behind) await behind;
      if (flags?.fua && !this.#p.sync) await fdatasync(this.#p.fd);
    } catch (err) {
      throw toBlockError(err, this.#where('write', offset, data.length));
    }
  }

  /** Scattered reads in one thread-pool job (pread per piece), see BlockBackend. */
  async readSegments(into: Uint8Array, segments: SegmentList): Promise<void> {
    if (segments.count === 0) return;
    if (this.#p.direct) {
      // O_DIRECT pieces may need read()'s unaligned-edge handling.
      await Promise.all(
        segments
          .toArray()
          .map(({ offset, length, position }) => this.read(offset, length, into.subarray(position, position + length))),
      );
      return;
    }
    try {
      await fileio.preadSegments(this.#p.fd, into, segments.array, segments.count);
    } catch (err) {
      throw toBlockError(err, this.#where('read', segments.offsetAt(0), segments.lengthAt(0)));
    }
  }

  /**
   * Pieces of a buffer to their own offsets in one thread-pool job (pwrite per piece),
   * see BlockBackend: convert's data split by zero runs, qcow2's runs of new clusters.
   */
  async writeSegments(from: Uint8Array, segments: SegmentList): Promise<void> {
    const count = segments.count;
    if (count === 0) return;
    if (this.#p.direct) {
      // O_DIRECT pieces may need the unaligned-edge handling of write(): keep it simple.
      await Promise.all(
        segments
          .toArray()
          .map(({ offset, length, position }) => this.write(offset, from.subarray(position, position + length))),
      );
      return;
    }
    this.#extents = null;
    try {
      await fileio.pwriteScatter(this.#p.fd, from, segments.array, count);
      await this.#wroteSegments(segments);
    } catch (err) {
      throw toBlockError(err, this.#where('write', segments.offsetAt(0), segments.lengthAt(0)));
    }
  }

  /** Write-behind of what writeSegments wrote: the span of ascending pieces at once, else each large one. */
  async #wroteSegments(segments: SegmentList): Promise<void> {
    const wb = this.#p.writeBehind;
    if (!wb) return;
    let ascending = true;
    for (let i = 1; i < segments.count && ascending; i++) ascending = segments.offsetAt(i) >= segments.endAt(i - 1);
    if (ascending) {
      const first = segments.offsetAt(0);
      const behind = wb.written(first, segments.endAt(segments.count - 1) - first);
      if (behind) await behind;
      return;
    }
    for (let i = 0; i < segments.count; i++) {
      const behind = wb.written(segments.offsetAt(i), segments.lengthAt(i));
      if (behind) await behind;
    }
  }

  /**
   * A copy step from this file: where the chunk's data lies, for the target (see
   * copyFrom). A fused copy is not offered with O_DIRECT (its edge handling lives in
   * read and write).
   */
  async copyTo(
    offset: number,
    length: number,
    target: BlockBackend,
    targetOffset: number,
    request: CopyRequest,
  ): Promise<boolean> {
    if (!target.copyFrom || (!request.offload && this.#p.direct)) return false;
    piecesAroundHoles(offset, length, request.holes, request.pieces);
    return target.copyFrom(targetOffset, length, this, request);
  }

  /** A copy step into this file from another local file: an offload or a fused copy. */
  async copyFrom(offset: number, length: number, source: BlockBackend, request: CopyRequest): Promise<boolean> {
    if (!(source instanceof FileBackend)) return false;
    return request.offload
      ? this.#copyRange(offset, length, source, request)
      : this.#pipe(offset, length, source, request);
  }

  /**
   * Copy offload: copy_file_range of each piece, so the bytes stay in the kernel (and a
   * file system that shares extents shares them). False where the kernel cannot (another
   * file system type, the same file overlapping); then the caller reads and writes.
   */
  async #copyRange(offset: number, length: number, source: FileBackend, request: CopyRequest): Promise<boolean> {
    this.#extents = null;
    request.issued();
    const pieces = request.pieces;
    try {
      for (let i = 0; i < pieces.count; i++) {
        const n = pieces.lengthAt(i);
        // The source file ended early (truncated since it was opened): a read gives zeroes there.
        if (
          (await fileio.copyRange(source.#p.fd, pieces.offsetAt(i), this.#p.fd, offset + pieces.positionAt(i), n)) < n
        )
          return false;
      }
      const behind = this.#p.writeBehind?.written(offset, length);
      if (behind) await behind;
      return true;
    } catch (err) {
      // Only the copy itself may decline; a failing write-behind is a failed write.
      if ((err as { syscall?: unknown }).syscall === 'copy_file_range' && cannotCopy(err)) return false;
      throw toBlockError(err, this.#where('write', offset, length));
    }
  }

  /**
   * A fused copy: fileio.pipe reads, scans and writes the chunk in one thread-pool job.
   * Not with O_DIRECT on either side.
   */
  async #pipe(offset: number, length: number, source: FileBackend, request: CopyRequest): Promise<boolean> {
    if (source.#p.direct || this.#p.direct) return false;
    this.#extents = null;
    const lists = pipeLists(request);
    let runs: number;
    try {
      const job = fileio.pipe(source.#p.fd, this.#p.fd, offset, length, lists.chunk, request.pieces.count);
      request.issued();
      runs = await job;
    } catch (err) {
      const syscall = (err as { syscall?: unknown }).syscall;
      const at = (err as { offset?: number }).offset ?? offset;
      if (syscall === 'pread') throw toBlockError(err, source.#where('read', at, length));
      if (syscall === 'pwrite') throw toBlockError(err, this.#where('write', at, length));
      throw err; // a request the native side refused (a caller's bug), as it is
    }
    const runList = lists.runs;
    for (let i = 0; i < runs; i++)
      request.zeroRuns.push(offset + runList[2 * i]!, runList[2 * i + 1]! - runList[2 * i]!, runList[2 * i]!);
    // What was written spans from the first data byte to the last: the zero runs at the ends were not.
    const first = runs > 0 && runList[0] === 0 ? runList[1]! : 0;
    const end = runs > 0 && runList[2 * runs - 1] === length ? runList[2 * runs - 2]! : length;
    const behind = end > first ? this.#p.writeBehind?.written(offset + first, end - first) : undefined;
    if (behind) {
      try {
        await behind;
      } catch (err) {
        throw toBlockError(err, this.#where('write', offset, length));
      }
    }
    return true;
  }

  async writeZeroes(offset: number, length: number, flags?: WriteZeroesFlags): Promise<void> {
    this.#extents = null;
    if (length === 0) return;
    try {
      if (this.#p.isDevice) await this.#zeroDevice(offset, length);
      else await this.#zeroFile(offset, length, flags?.mayUnmap === true, flags?.fast === true);
    } catch (err) {
      throw toBlockError(err, this.#where('writeZeroes', offset, length));
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    this.#extents = null;
    if (length === 0 || this.#noDiscard) return;
    try {
      if (this.#p.isDevice) {
        // BLKDISCARD wants whole sectors; discard is advisory, so drop the edges.
        const a = this.#p.sectorSize;
        const start = roundUp(offset, a);
        const end = roundDown(offset + length, a);
        if (end > start) await fileio.blockDeviceDiscard(this.#p.fd, start, end - start);
      } else if (!this.#noPunch) {
        await fileio.fallocate(this.#p.fd, PUNCH, offset, length);
      }
    } catch (err) {
      if (isUnsupported(err)) {
        this.#noDiscard = true;
        if (!this.#p.isDevice) this.#noPunch = true;
      } else if (errCode(err) !== 'EINVAL') throw toBlockError(err, this.#where('discard', offset, length));
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    if (!this.canBlockStatus) return { kind: 'data', length: this.size - offset, offset };
    const cached = this.#cachedExtent(offset);
    if (cached) return cached;
    try {
      this.#extents = await fileio.extents(this.#p.fd, offset, this.size, EXTENT_BATCH);
      this.#extentsStart = this.#extentOffset = offset;
      this.#extentIndex = 0;
    } catch (err) {
      this.#extents = null;
      throw toBlockError(err, this.#where('blockStatus', offset, length));
    }
    return this.#cachedExtent(offset) ?? { kind: 'data', length: this.size - offset, offset };
  }

  /** The extent at `offset` from the read-ahead batch, if the batch covers it. */
  #cachedExtent(offset: number): Extent | undefined {
    const ext = this.#extents;
    if (!ext || offset < this.#extentsStart) return undefined;
    let i = this.#extentIndex;
    let start = this.#extentOffset;
    if (offset < start) {
      i = 0;
      start = this.#extentsStart;
    }
    for (; 2 * i < ext.length; i++) {
      const end = start + ext[2 * i]!;
      if (offset < end) {
        this.#extentIndex = i;
        this.#extentOffset = start;
        // A hole in a raw file reads as zeroes; there is nothing below a file to read through to.
        // The bytes live at the same offset of the file (map's "offset").
        return { kind: ext[2 * i + 1] ? 'data' : 'zero', length: end - offset, offset };
      }
      start = end;
    }
    return undefined;
  }

  get size(): number {
    return this.#size;
  }

  /** Grows or shrinks a regular file (a format driver allocating past its end); devices keep their size. */
  async resize(size: number): Promise<void> {
    if (this.#p.isDevice) {
      if (size > this.#size)
        throw new BlockError(
          'ENOSPC',
          `a block device cannot grow (size ${this.#size})`,
          this.#where('resize', size, 0),
        );
      return;
    }
    try {
      await ftruncate(this.#p.bufferedFd, size);
    } catch (err) {
      throw toBlockError(err, this.#where('resize', size, 0));
    }
    this.#extents = null;
    this.#size = size;
    this.#p.writeBehind?.grown(size);
  }

  async flush(): Promise<void> {
    if (this.readOnly || this.#p.unsafe) return;
    try {
      // fdatasync syncs the file, not the fd, so this covers the buffered fd too.
      await fdatasync(this.#p.fd);
    } catch (err) {
      throw toBlockError(err, { op: 'flush', location: this.location });
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const fds = this.#p.bufferedFd === this.#p.fd ? [this.#p.fd] : [this.#p.fd, this.#p.bufferedFd];
    const results = await Promise.allSettled(fds.map((fd) => closeFd(fd)));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw toBlockError(failed.reason, { op: 'close', location: this.location });
  }

  async info(): Promise<Record<string, unknown>> {
    return {};
  }

  async allocatedSize(): Promise<number | undefined> {
    if (this.#p.isDevice || this.#closed) return undefined;
    const st = await fstat(this.#p.fd);
    return st.blocks * 512;
  }

  async identity(): Promise<BackendIdentity> {
    const st = await new Promise<fs.BigIntStats>((resolve, reject) =>
      fs.fstat(this.#p.fd, { bigint: true }, (err, s) => (err ? reject(err) : resolve(s))),
    );
    // A block device's mtime says nothing about its content: the id alone.
    if (this.#p.isDevice) return { id: `${st.rdev}` };
    return { id: `${st.dev}:${st.ino}`, version: `${st.mtimeNs}` };
  }

  // --- internals -----------------------------------------------------------------

  #where(op: string, offset: number, length: number) {
    return { op, location: this.location, offset, length };
  }

  /**
   * Reads or writes all of `buf` at `offset`. With O_DIRECT the block-aligned middle
   * goes direct; unaligned edges (in practice only the tail at an unaligned image
   * end) go through the buffered fd, which the kernel keeps coherent with direct I/O.
   */
  async #transfer(write: boolean, buf: Uint8Array, offset: number): Promise<void> {
    if (!this.#p.direct) return this.#transferAll(write, this.#p.fd, buf, offset);
    const end = offset + buf.length;
    const mid = Math.min(roundUp(offset, this.#align), end);
    const midEnd = Math.max(roundDown(end, this.#align), mid);
    if (mid > offset) await this.#transferAll(write, this.#p.bufferedFd, buf.subarray(0, mid - offset), offset);
    if (midEnd > mid) await this.#transferDirect(write, buf.subarray(mid - offset, midEnd - offset), mid);
    if (end > midEnd) await this.#transferAll(write, this.#p.bufferedFd, buf.subarray(midEnd - offset), midEnd);
  }

  /** Loops over short reads and writes; reads past EOF give zeroes. */
  async #transferAll(write: boolean, fd: number, buf: Uint8Array, offset: number): Promise<void> {
    for (let done = 0; done < buf.length; ) {
      const part = buf.subarray(done);
      const n = write ? await pwrite(fd, part, offset + done) : await pread(fd, part, offset + done);
      if (n === 0) {
        if (!write) {
          part.fill(0);
          return;
        }
        // A plain error so the caller's toBlockError adds the request details.
        throw Object.assign(new Error('write made no progress'), { code: 'EIO' });
      }
      done += n;
    }
  }

  /** One O_DIRECT call; whatever it leaves (EOF, a short write) continues buffered. */
  async #transferDirect(write: boolean, buf: Uint8Array, offset: number): Promise<void> {
    const op = write ? pwrite : pread;
    let n: number;
    try {
      n = await op(this.#p.fd, buf, offset);
    } catch (err) {
      if (errCode(err) !== 'EINVAL') throw err;
      // Request is aligned, so the caller's memory is not (a buffer not from
      // allocBuffer). Bounce through aligned memory rather than fail.
      const bounce = fileio.allocAligned(buf.length, MEM_ALIGN);
      if (write) bounce.set(buf);
      n = await op(this.#p.fd, bounce, offset);
      if (!write) buf.set(bounce.subarray(0, n));
    }
    if (n < buf.length) await this.#transferAll(write, this.#p.bufferedFd, buf.subarray(n), offset + n);
  }

  /**
   * Zeroes a file range with the cheapest method the file system has: punching a
   * hole when unmapping is allowed, else ZERO_RANGE (which keeps blocks allocated),
   * each falling back to the other and finally to writing zeroes, which a fast zero
   * refuses instead (ENOTSUP, nothing changed).
   */
  async #zeroFile(offset: number, length: number, mayUnmap: boolean, fast: boolean): Promise<void> {
    const punch = (): Promise<boolean> => this.#tryFallocate('punch', offset, length);
    const zero = (): Promise<boolean> => this.#tryFallocate('zero', offset, length);
    const done = mayUnmap
      ? (await punch()) || (await zero())
      : (await zero()) || (await this.#punchAndReallocate(offset, length));
    if (done) return;
    if (fast)
      throw Object.assign(new Error('the file system cannot zero without writing (no fallocate punch or zero range)'), {
        code: 'ENOTSUP',
      });
    await this.#writeZeroBuffer(offset, length);
  }

  /** Without ZERO_RANGE, punch then reallocate (as QEMU does) so the range stays allocated. */
  async #punchAndReallocate(offset: number, length: number): Promise<boolean> {
    if (!(await this.#tryFallocate('punch', offset, length))) return false;
    await fileio.fallocate(this.#p.fd, 0, offset, length).catch((err: unknown) => {
      if (!isUnsupported(err)) throw err; // the range reads as zeroes either way
    });
    return true;
  }

  /** True when done; false when the file system cannot, remembering a lasting "cannot". */
  async #tryFallocate(method: 'punch' | 'zero', offset: number, length: number): Promise<boolean> {
    if (method === 'punch' ? this.#noPunch : this.#noZeroRange) return false;
    try {
      await fileio.fallocate(this.#p.fd, method === 'punch' ? PUNCH : ZERO_RANGE, offset, length);
      return true;
    } catch (err) {
      if (isUnsupported(err)) {
        if (method === 'punch') this.#noPunch = true;
        else this.#noZeroRange = true;
        return false;
      }
      // Some file systems refuse unaligned ranges with EINVAL: fall back for this one only.
      if (errCode(err) === 'EINVAL') return false;
      throw err;
    }
  }

  /** BLKZEROOUT for the whole sectors of the range, written zeroes for the edges. */
  async #zeroDevice(offset: number, length: number): Promise<void> {
    const a = this.#p.sectorSize;
    const end = offset + length;
    const start = roundUp(offset, a);
    const stop = roundDown(end, a);
    if (this.#noZeroOut || stop <= start) return this.#writeZeroBuffer(offset, length);
    if (start > offset) await this.#writeZeroBuffer(offset, start - offset);
    try {
      await fileio.blockDeviceZeroOut(this.#p.fd, start, stop - start);
    } catch (err) {
      if (!isUnsupported(err)) throw err;
      this.#noZeroOut = true;
      await this.#writeZeroBuffer(start, stop - start);
    }
    if (end > stop) await this.#writeZeroBuffer(stop, end - stop);
  }

  async #writeZeroBuffer(offset: number, length: number): Promise<void> {
    // Shared by concurrent calls; it is only ever read.
    const zeroes = (this.#zeroBuf ??= this.allocBuffer ? this.allocBuffer(ZERO_CHUNK) : new Uint8Array(ZERO_CHUNK));
    for (let done = 0; done < length; ) {
      const n = Math.min(ZERO_CHUNK, length - done);
      await this.#transfer(true, zeroes.subarray(0, n), offset + done);
      done += n;
    }
  }
}

/** Opens a regular file or block device. Errors come back as BlockErrors naming the location. */
export async function openFile(location: string, options: OpenOptions = {}): Promise<FileBackend> {
  options.signal?.throwIfAborted();
  const readOnly = options.readOnly === true;
  const cache = options.cache ?? 'writeback';
  const direct = cache === 'none' || cache === 'directsync';
  const sync = cache === 'writethrough' || cache === 'directsync';
  const flags = (readOnly ? O_RDONLY : O_RDWR) | (sync ? O_DSYNC : 0);
  const where = { op: 'open', location };
  const fds: number[] = [];
  try {
    let fd: number;
    try {
      fd = await openFd(location, flags | (direct ? O_DIRECT : 0));
    } catch (err) {
      if (direct && errCode(err) === 'EINVAL') {
        throw new BlockError(
          'EINVAL',
          `the file system does not support O_DIRECT (cache=${cache}); use another cache mode`,
          { ...where, cause: err },
        );
      }
      throw err;
    }
    fds.push(fd);
    const st = await fstat(fd);
    if (st.isDirectory()) throw new BlockError('EISDIR', 'is a directory', where);
    const isDevice = st.isBlockDevice();
    if (!isDevice && !st.isFile()) throw new BlockError('EINVAL', 'not a regular file or block device', where);
    const size = isDevice ? await fileio.blockDeviceSize(fd) : st.size;
    const sectorSize = isDevice ? await fileio.logicalBlockSize(fd) : FILE_DIRECT_ALIGN;
    let bufferedFd = fd;
    if (direct) {
      // Reopen through /proc so the buffered fd is surely the same inode.
      bufferedFd = await openFd(`/proc/self/fd/${fd}`, flags).catch(() => openFd(location, flags));
      fds.push(bufferedFd);
    }
    const unsafe = cache === 'unsafe';
    // Checked on every open, so a bad value fails even where it would not apply.
    const behind = parseWriteBehindOption(location, options.options?.['write-behind']);
    // Direct and synchronous writes leave nothing dirty to write behind.
    const writeBehind =
      behind && !readOnly && !direct && !sync
        ? await writeBehindFor({ fd, location, isDevice, size, unsafe })
        : undefined;
    return new FileBackend({
      location,
      fd,
      bufferedFd,
      size,
      readOnly,
      isDevice,
      direct,
      sync,
      unsafe,
      sectorSize,
      writeBehind,
    });
  } catch (err) {
    for (const fd of fds) fs.close(fd, () => {});
    throw toBlockError(err, where);
  }
}

/**
 * Creates `location` as a sparse file of exactly `size` bytes, replacing any existing
 * file (qemu-img semantics). An existing block device is used as it is, provided it
 * is large enough.
 */
export async function createFile(location: string, size: number, options: CreateOptions = {}): Promise<CreateResult> {
  options.signal?.throwIfAborted();
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new BlockError('EINVAL', `invalid image size ${size}`, { op: 'create', location });
  }
  try {
    const st = await stat(location).catch((err: unknown) => {
      if (errCode(err) === 'ENOENT') return undefined;
      throw err;
    });
    if (st?.isBlockDevice()) {
      const fd = await openFd(location, O_RDWR);
      try {
        const devSize = await fileio.blockDeviceSize(fd);
        if (devSize < size) {
          throw new BlockError('ENOSPC', `device holds ${devSize} bytes, the image needs ${size}`, {
            op: 'create',
            location,
          });
        }
      } finally {
        await closeFd(fd);
      }
      return { zeroInitialized: false }; // the device keeps what it held
    }
    // Truncating to 0 first drops every old block, so the result is all hole.
    const fd = await openFd(location, O_WRONLY | O_CREAT | O_TRUNC, 0o644);
    try {
      await ftruncate(fd, size);
    } finally {
      await closeFd(fd);
    }
    return { zeroInitialized: true }; // all hole
  } catch (err) {
    throw toBlockError(err, { op: 'create', location });
  }
}

export const fileDriver: ProtocolDriver = {
  apiVersion: BLOCK_API_VERSION,
  kind: 'protocol',
  name: 'file',
  description: 'local files and block devices',
  schemes: ['file'],
  openOptions: [
    {
      name: 'write-behind',
      description:
        "for writes of 256 KiB or more through the page cache: start their writeback at once and drop each from the cache once it is on the disk, so a long copy does not pile up dirty pages; with cache=unsafe only once the file is larger than the kernel's background dirty threshold (off: leave it all to the kernel)",
      default: 'on',
      values: ['on', 'off'],
    },
  ],
  open: openFile,
  create: createFile,
};
