/**
 * Native file I/O that Node's fs lacks (Linux only): SEEK_DATA/SEEK_HOLE, fallocate,
 * write-behind (sync_file_range), in-kernel copies (copy_file_range), a chunk's copy
 * with its zero scan in one job (pipe), block device ioctls and aligned buffers for O_DIRECT.
 *
 * Every async call runs its syscalls on the libuv thread pool. Failures reject with
 * an Error shaped like Node's fs errors: `code` ('ENOSPC', 'EOPNOTSUPP', ...), negative
 * `errno` and `syscall`. Codes are glibc's names, so errno 95 is 'EOPNOTSUPP' where
 * Node's fs says 'ENOTSUP' (on other C libraries they are libuv's, as in Node). Bad argument types throw a TypeError synchronously,
 * out-of-range numbers a RangeError. Offsets and lengths are numbers up to 2^53 - 1.
 */
import { createRequire } from 'node:module';

/** Result of blockStatus: the extent that starts at the asked offset. */
export interface BlockStatusResult {
  /** True for data (allocated), false for a hole. */
  readonly data: boolean;
  /** Bytes of this kind from the offset; never past fileSize, 0 only at or past it. */
  readonly length: number;
}

/** The error every async function rejects with on a failed syscall. */
export interface FileIoError extends Error {
  readonly code: string;
  readonly errno: number;
  readonly syscall: string;
  /** The file offset of the failed read or write, where known (pipe). */
  readonly offset?: number;
}

interface FallocConstants {
  readonly FALLOC_FL_KEEP_SIZE: number;
  readonly FALLOC_FL_PUNCH_HOLE: number;
  readonly FALLOC_FL_NO_HIDE_STALE: number;
  readonly FALLOC_FL_COLLAPSE_RANGE: number;
  readonly FALLOC_FL_ZERO_RANGE: number;
  readonly FALLOC_FL_INSERT_RANGE: number;
  readonly FALLOC_FL_UNSHARE_RANGE: number;
}

interface Native {
  blockStatus(fd: number, offset: number, fileSize: number): Promise<BlockStatusResult>;
  extents(fd: number, offset: number, fileSize: number, maxExtents: number): Promise<Float64Array>;
  pwriteSegments(fd: number, buffer: Uint8Array, offset: number, segments: Float64Array, count: number): Promise<void>;
  preadSegments(fd: number, buffer: Uint8Array, segments: Float64Array, count: number): Promise<void>;
  pwriteScatter(fd: number, buffer: Uint8Array, segments: Float64Array, count: number): Promise<void>;
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<void>;
  writeBehind(fd: number, offset: number, length: number, evictOffset: number, evictLength: number): Promise<void>;
  copyRange(srcFd: number, srcOffset: number, dstFd: number, dstOffset: number, length: number): Promise<number>;
  pipe(
    srcFd: number,
    pieces: Float64Array,
    pieceCount: number,
    dstFd: number,
    dstOffset: number,
    length: number,
    buffer: Uint8Array,
    holes: Float64Array,
    holeCount: number,
    unit: number,
    minRun: number,
    runs: Float64Array,
  ): Promise<number>;
  blockDeviceSize(fd: number): Promise<number>;
  blockDeviceZeroOut(fd: number, offset: number, length: number): Promise<void>;
  blockDeviceDiscard(fd: number, offset: number, length: number): Promise<void>;
  logicalBlockSize(fd: number): Promise<number>;
  allocAligned(size: number, alignment: number): Buffer;
  readonly constants: FallocConstants;
}

// An ESM module cannot import a .node file; createRequire can. The path is relative
// to this file, which lives in src/ (tsx) or dist/ (built), both beside build/.
const native = createRequire(import.meta.url)('../build/Release/fileio.node') as Native;

export const {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_NO_HIDE_STALE,
  FALLOC_FL_COLLAPSE_RANGE,
  FALLOC_FL_ZERO_RANGE,
  FALLOC_FL_INSERT_RANGE,
  FALLOC_FL_UNSHARE_RANGE,
} = native.constants;

/**
 * What lies at `offset` of the file: lseek(SEEK_DATA) then lseek(SEEK_HOLE), clamped
 * to `fileSize`. File systems without SEEK_DATA report everything as data.
 */
export function blockStatus(fd: number, offset: number, fileSize: number): Promise<BlockStatusResult> {
  return native.blockStatus(fd, offset, fileSize);
}

/**
 * Up to `maxExtents` consecutive extents from `offset`, found as blockStatus finds
 * them, in one thread-pool job: pairs [length, isData (1 or 0)], the first starting at
 * `offset`. Empty at or past `fileSize`.
 */
export function extents(fd: number, offset: number, fileSize: number, maxExtents: number): Promise<Float64Array> {
  return native.extents(fd, offset, fileSize, maxExtents);
}

/**
 * Writes buffer[segments[2i], segments[2i+1]) at offset + segments[2i] for i < count,
 * in one thread-pool job (pwrite per segment, short writes resumed). The segment list
 * is copied at the call, so the caller may reuse it; the buffer must stay unchanged
 * until the promise settles.
 */
export function pwriteSegments(
  fd: number,
  buffer: Uint8Array,
  offset: number,
  segments: Float64Array,
  count: number,
): Promise<void> {
  return native.pwriteSegments(fd, buffer, offset, segments, count);
}

/**
 * For i < count reads segments[3i+1] bytes at file offset segments[3i] into
 * buffer[segments[3i+2]...], in one thread-pool job; bytes past the end of the file
 * read as zeroes. The list is copied at the call; the buffer is filled when it settles.
 */
export function preadSegments(fd: number, buffer: Uint8Array, segments: Float64Array, count: number): Promise<void> {
  return native.preadSegments(fd, buffer, segments, count);
}

/**
 * The mirror of preadSegments: for i < count writes segments[3i+1] bytes of
 * buffer[segments[3i+2]...] at file offset segments[3i], in one thread-pool job (the
 * pieces of one request going to unrelated places). The list is copied at the call.
 */
export function pwriteScatter(fd: number, buffer: Uint8Array, segments: Float64Array, count: number): Promise<void> {
  return native.pwriteScatter(fd, buffer, segments, count);
}

/** fallocate(2); `mode` is an OR of the FALLOC_FL_* constants (0 allocates). */
export function fallocate(fd: number, mode: number, offset: number, length: number): Promise<void> {
  return native.fallocate(fd, mode, offset, length);
}

/**
 * Write-behind for long sequential writes through the page cache: starts writeback of
 * [offset, offset + length) without waiting (sync_file_range WRITE), then waits until
 * [evictOffset, evictOffset + evictLength) is on the disk and drops it from the cache
 * (fadvise DONTNEED). Dirty pages then stay near what the caller keeps in its window,
 * instead of piling up to the kernel's dirty limit. Not a flush: it does not commit
 * metadata or the disk's cache. A length of 0 skips that part.
 */
export function writeBehind(
  fd: number,
  offset: number,
  length: number,
  evictOffset: number,
  evictLength: number,
): Promise<void> {
  return native.writeBehind(fd, offset, length, evictOffset, evictLength);
}

/**
 * Copies `length` bytes at `srcOffset` of one file to `dstOffset` of another inside the
 * kernel (copy_file_range, looping over partial copies): the data never passes through
 * this process, and file systems that share extents (reflink) or servers that copy
 * (NFS 4.2) move none at all. Resolves with the bytes copied: less than `length` only
 * where the source ends. EXDEV, EOPNOTSUPP, ENOSYS or EINVAL mean the kernel cannot do
 * this copy; some bytes may have been copied before an error.
 */
export function copyRange(
  srcFd: number,
  srcOffset: number,
  dstFd: number,
  dstOffset: number,
  length: number,
): Promise<number> {
  return native.copyRange(srcFd, srcOffset, dstFd, dstOffset, length);
}

/** Where pipe finds a chunk's bytes and what it knows of them. */
export interface PipeChunk {
  /** preadSegments' triples: source offset, length, position in the chunk (pipe's pieceCount of them). */
  readonly pieces: Float64Array;
  readonly buffer: Uint8Array;
  /** Holes of the chunk, [start, end) pairs relative to it: zero runs, not read. */
  readonly holes: Float64Array;
  readonly holeCount: number;
  /** Zero runs are whole units of this size, of at least minRun bytes; minRun 0 scans nothing. */
  readonly unit: number;
  readonly minRun: number;
  /** Receives the zero runs found, [start, end) pairs relative to the chunk. */
  readonly runs: Float64Array;
}

/**
 * One chunk of a file-to-file copy in one thread-pool job: reads `pieceCount` pieces of
 * `srcFd` into the buffer (bytes past the end of the file read as zeroes), finds the
 * zero runs as the core's ZeroScanner does, and writes everything else to `dstFd` at
 * `dstOffset` (chunk position p at dstOffset + p). Resolves with the number of zero
 * runs, left in `runs` and not written. A failed read rejects with syscall 'pread', a
 * failed write with 'pwrite', each with the file `offset`. The lists are copied at
 * the call; the buffer and `runs` must stay untouched until it settles.
 */
export function pipe(
  srcFd: number,
  dstFd: number,
  dstOffset: number,
  length: number,
  c: PipeChunk,
  pieceCount: number,
): Promise<number> {
  return native.pipe(
    srcFd,
    c.pieces,
    pieceCount,
    dstFd,
    dstOffset,
    length,
    c.buffer,
    c.holes,
    c.holeCount,
    c.unit,
    c.minRun,
    c.runs,
  );
}

/** Size of a block device in bytes (BLKGETSIZE64). */
export function blockDeviceSize(fd: number): Promise<number> {
  return native.blockDeviceSize(fd);
}

/** Zeroes a range of a block device (BLKZEROOUT); both must be multiples of the logical block size. */
export function blockDeviceZeroOut(fd: number, offset: number, length: number): Promise<void> {
  return native.blockDeviceZeroOut(fd, offset, length);
}

/** Discards a range of a block device (BLKDISCARD); contents afterwards are device-defined. */
export function blockDeviceDiscard(fd: number, offset: number, length: number): Promise<void> {
  return native.blockDeviceDiscard(fd, offset, length);
}

/** Logical block (sector) size of a block device (BLKSSZGET): the O_DIRECT alignment. */
export function logicalBlockSize(fd: number): Promise<number> {
  return native.logicalBlockSize(fd);
}

/**
 * A zero-filled Buffer of `size` bytes whose memory starts at a multiple of
 * `alignment` (a power of two >= 8), as O_DIRECT needs; freed when collected.
 * Synchronous: it is a plain allocation.
 */
export function allocAligned(size: number, alignment: number): Buffer {
  return native.allocAligned(size, alignment);
}
