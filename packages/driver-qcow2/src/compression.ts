/**
 * Decompression of compressed clusters (qcow2.txt "Compressed Clusters Descriptor").
 * The descriptor gives the compressed size only to 512-byte sector granularity, so
 * the input may carry bytes of the next cluster after the stream: decompression, as
 * in QEMU, must produce exactly one cluster and ignore what follows.
 *
 * With @blockconv/codec (native libdeflate/libzstd, an optional dependency) a group
 * of clusters is one batch: a few thread-pool jobs writing whole clusters straight
 * into the caller's buffer. Without it (not built, or BLOCKCONV_NATIVE_CODEC=0):
 * - zlib: raw deflate through node:zlib's async API, which runs on libuv's thread
 *   pool, so clusters decompress in parallel.
 * - zstd: libzstd compiled to WebAssembly in worker threads (zstd-pool.ts).
 * zstd frames are measured here either way (zstdFrameLength), so trailing bytes are
 * cut and hostile headers are refused before anything is allocated.
 */
import { constants as zc, inflateRaw } from 'node:zlib';
import { BlockError, SegmentList, type GatedBackend } from '@blockconv/core';
import { COMPRESSION_ZLIB, COMPRESSION_ZSTD } from './header.js';
import { ZstdBatchError, zstdPool, type ZstdBatch } from './zstd-pool.js';

const ZSTD_MAGIC = 0xfd2fb528;
/** Largest zstd window accepted: QEMU's frames use at most one cluster (2 MiB); this leaves room for other writers. */
const MAX_ZSTD_WINDOW = 8 * 1024 * 1024;
/** zstd's Block_Maximum_Size. */
const ZSTD_MAX_BLOCK = 128 * 1024;

export interface CompressedRef {
  readonly location: string;
  /** Host offset of the compressed data, for messages. */
  readonly host: number;
  /** Guest offset of the cluster, for messages. */
  readonly guest: number;
}

/** One cluster of a group: its compressed bytes start at `start` in the group's buffer. */
export interface CompressedItem extends CompressedRef {
  readonly start: number;
  /** Where the bytes it may use end in that buffer (its group's end); default: the buffer's end. */
  readonly end?: number;
}

function bad(ref: CompressedRef, message: string, cause?: unknown): BlockError {
  return new BlockError('ECORRUPT', `compressed cluster at guest offset ${ref.guest}: ${message}`, {
    location: ref.location,
    op: 'read',
    field: 'compressed cluster',
    offset: ref.host,
    cause,
  });
}

/** Decompressed clusters, valid until release() (their memory may be recycled). */
export interface DecompressedGroup {
  readonly clusters: readonly Uint8Array[];
  release(): void;
}

/** A cluster of a group and where its wanted bytes go in the caller's buffer. */
export interface PlacedItem extends CompressedItem {
  /** Offset in the output buffer. */
  readonly outAt: number;
  /** First wanted byte of the cluster, and how many. */
  readonly inCluster: number;
  readonly length: number;
}

const noop = (): void => {};

/** What this module needs of @blockconv/codec (typed here: it is optional and may be absent). */
export interface NativeCodec {
  readonly available: boolean;
  decompressBatch(batch: {
    kind: 'zlib' | 'zstd';
    clusterSize: number;
    input: Uint8Array;
    spans: Float64Array;
    count?: number;
    output: Uint8Array;
  }): Promise<void>;
  compressBatch(batch: {
    kind: 'zlib' | 'zstd';
    clusterSize: number;
    input: Uint8Array;
    spans: Float64Array;
    count?: number;
    output: Uint8Array;
    lengths: Int32Array;
  }): Promise<Int32Array>;
}

/** The codec module: a variable, so that neither tsc nor bundlers require it to exist. */
const CODEC_MODULE = '@blockconv/codec';
let codecModule: NativeCodec | null | undefined;
let codecLoading: Promise<NativeCodec | null> | undefined;

/** The native codec, or null when it is not installed or built, or BLOCKCONV_NATIVE_CODEC=0 turns it off. */
export async function nativeCodec(): Promise<NativeCodec | null> {
  if (process.env.BLOCKCONV_NATIVE_CODEC === '0') return null;
  if (codecModule !== undefined) return codecModule;
  codecLoading ??= import(CODEC_MODULE)
    .then(
      (m: NativeCodec) => (m.available ? m : null),
      () => null,
    )
    .then((m) => (codecModule = m));
  return codecLoading;
}

/** Whether reads use the native codec (false: node:zlib and WebAssembly libzstd). */
export async function usesNativeCodec(): Promise<boolean> {
  return (await nativeCodec()) !== null;
}

/**
 * Scratch buffers for clusters wanted only in part, kept for reuse (at most
 * MAX_SPARE_BYTES): fresh buffers would be garbage the size of the data.
 */
const MAX_SPARE_BYTES = 16 * 1024 * 1024;
const spare: Uint8Array[] = [];
let spareBytes = 0;

function takeScratch(bytes: number): Uint8Array {
  let best = -1;
  for (let i = 0; i < spare.length; i++) {
    if (spare[i]!.length >= bytes && (best < 0 || spare[i]!.length < spare[best]!.length)) best = i;
  }
  if (best < 0) return new Uint8Array(bytes);
  const [b] = spare.splice(best, 1);
  spareBytes -= b!.length;
  return b!;
}

function giveScratch(b: Uint8Array): void {
  if (spareBytes + b.length > MAX_SPARE_BYTES) return;
  spare.push(b);
  spareBytes += b.length;
}

function kindName(type: number, ref: CompressedRef | undefined): 'zlib' | 'zstd' {
  if (type === COMPRESSION_ZLIB) return 'zlib';
  if (type === COMPRESSION_ZSTD) return 'zstd';
  throw new BlockError('ENOTSUP', `unknown compression type ${type}`, { location: ref?.location, op: 'read' });
}

/**
 * Spans for the codec: per item (input offset, input length, output offset). zstd
 * frames are measured (and vetted) here; a zlib stream may run to the end of the group.
 */
function spansOf(
  kind: 'zlib' | 'zstd',
  raw: Uint8Array,
  items: readonly CompressedItem[],
  clusterSize: number,
  outAt: (i: number) => number,
): Float64Array {
  const spans = new Float64Array(3 * items.length);
  items.forEach((item, i) => {
    const length =
      kind === 'zstd'
        ? zstdFrameLength(raw.subarray(item.start, item.end), clusterSize, item)
        : (item.end ?? raw.length) - item.start;
    spans[3 * i] = item.start;
    spans[3 * i + 1] = length;
    spans[3 * i + 2] = outAt(i);
  });
  return spans;
}

/** The codec's error (naming a cluster of the batch) as the BlockError of that cluster. */
function batchError(kind: string, items: readonly CompressedRef[], err: unknown): unknown {
  const e = err as { code?: string; index?: number; reason?: string } | null;
  if (!e || typeof e.index !== 'number' || !items[e.index]) return err;
  if (e.code !== 'ECORRUPT')
    return new BlockError('EIO', `compressed cluster at guest offset ${items[e.index]!.guest}: ${kind}: ${e.reason}`, {
      location: items[e.index]!.location,
      op: 'read',
      cause: err,
    });
  return bad(items[e.index]!, `${kind}: ${e.reason}`, err);
}

/**
 * Decompresses the clusters of a group of compressed data read in one piece
 * (trailing bytes after each stream allowed) and copies each item's wanted bytes to
 * `out` at its outAt. With the native codec, whole clusters are written in place.
 * Rejects with the first failing cluster's error once every cluster settled.
 */
export async function decompressGroupInto(
  type: number,
  raw: Uint8Array,
  items: readonly PlacedItem[],
  clusterSize: number,
  out: Uint8Array,
): Promise<void> {
  const codec = await nativeCodec();
  if (!codec) {
    const done = await decompressGroup(type, raw, items, clusterSize);
    try {
      items.forEach((item, i) => {
        out.set(done.clusters[i]!.subarray(item.inCluster, item.inCluster + item.length), item.outAt);
      });
    } finally {
      done.release();
    }
    return;
  }
  const kind = kindName(type, items[0]);
  const whole: PlacedItem[] = [];
  const partial: PlacedItem[] = [];
  for (const item of items) (item.inCluster === 0 && item.length === clusterSize ? whole : partial).push(item);
  // Every frame is vetted before any job starts: a job must not outlive a rejection.
  const wholeSpans = spansOf(kind, raw, whole, clusterSize, (i) => whole[i]!.outAt);
  // Clusters wanted in part (at the edges of a request) go through a scratch buffer.
  const partialSpans = spansOf(kind, raw, partial, clusterSize, (i) => i * clusterSize);
  const jobs: Array<Promise<void>> = [];
  if (whole.length) {
    jobs.push(
      codec.decompressBatch({ kind, clusterSize, input: raw, spans: wholeSpans, output: out }).catch((err: unknown) => {
        throw batchError(kind, whole, err);
      }),
    );
  }
  if (partial.length) {
    const scratch = takeScratch(partial.length * clusterSize);
    jobs.push(
      codec.decompressBatch({ kind, clusterSize, input: raw, spans: partialSpans, output: scratch }).then(
        () => {
          partial.forEach((item, i) => {
            out.set(
              scratch.subarray(i * clusterSize + item.inCluster, i * clusterSize + item.inCluster + item.length),
              item.outAt,
            );
          });
          giveScratch(scratch);
        },
        (err: unknown) => {
          giveScratch(scratch);
          throw batchError(kind, partial, err);
        },
      ),
    );
  }
  const results = await Promise.allSettled(jobs);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}

/** A run of compressed data in the file (`start` to `end`) and the clusters in it. */
export interface HostGroup {
  readonly start: number;
  readonly end: number;
  readonly items: ReadonlyArray<{
    readonly host: number;
    readonly guest: number;
    readonly outAt: number;
    readonly inCluster: number;
    readonly length: number;
  }>;
}

/** Groups of one file for one output buffer, gathered until the current task yields. */
interface PendingRead {
  readonly file: GatedBackend;
  readonly type: number;
  readonly clusterSize: number;
  readonly out: Uint8Array;
  readonly groups: HostGroup[];
  readonly done: Promise<void>;
  settle(err?: unknown): void;
}

let pendingReads: PendingRead[] = [];

/**
 * Reads and decompresses a group of compressed clusters into `out`. Groups asked for
 * in the same synchronous run (one read request walking its clusters: qemu-img
 * writes compressed clusters in completion order, so they seldom sit next to each
 * other in the file) are fetched together, with one vectored read where the file
 * has one, and decompressed as one batch: two thread-pool round trips per request
 * instead of two per cluster. Settles once every cluster of the batch has.
 */
export function readCompressedGroup(
  file: GatedBackend,
  type: number,
  clusterSize: number,
  group: HostGroup,
  out: Uint8Array,
): Promise<void> {
  let batch = pendingReads.find(
    (p) => p.file === file && p.out === out && p.type === type && p.clusterSize === clusterSize,
  );
  if (!batch) {
    if (pendingReads.length === 0) queueMicrotask(flushReads);
    let settle!: (err?: unknown) => void;
    const done = new Promise<void>((resolve, reject) => {
      settle = (err) => (err === undefined ? resolve() : reject(err));
    });
    batch = { file, type, clusterSize, out, groups: [], done, settle };
    pendingReads.push(batch);
  }
  batch.groups.push(group);
  return batch.done;
}

function flushReads(): void {
  const batches = pendingReads;
  pendingReads = [];
  for (const b of batches)
    readBatch(b).then(
      () => b.settle(),
      (err: unknown) => b.settle(err ?? new Error('compressed read failed')),
    );
}

async function readBatch(b: PendingRead): Promise<void> {
  const { file, groups } = b;
  let total = 0;
  for (const g of groups) total += g.end - g.start;
  const memAlign = Math.max(1, file.limits.minMemAlignment ?? 1);
  const alignKey = memAlign > 1 && file.allocBuffer ? memAlign : 1;
  const input = takeInput(total, alignKey, file);
  try {
    const items: PlacedItem[] = [];
    const segments = new Float64Array(3 * groups.length);
    let at = 0;
    groups.forEach((g, i) => {
      segments[3 * i] = g.start;
      segments[3 * i + 1] = g.end - g.start;
      segments[3 * i + 2] = at;
      // A stream may use the bytes up to its group's end, as when each group was read alone.
      const end = at + g.end - g.start;
      for (const item of g.items)
        items.push({ ...item, location: file.location, start: at + item.host - g.start, end });
      at += g.end - g.start;
    });
    if (groups.length > 1 && file.readSegments && file.limits.requestAlignment === 1 && memAlign === 1) {
      await file.readSegments(input, new SegmentList(segments.subarray(0, 3 * groups.length), groups.length));
    } else {
      const reads = groups.map((g, i) =>
        file.read(
          g.start,
          g.end - g.start,
          input.subarray(segments[3 * i + 2]!, segments[3 * i + 2]! + g.end - g.start),
        ),
      );
      const results = await Promise.allSettled(reads);
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failed) throw failed.reason;
    }
    await decompressGroupInto(b.type, input.subarray(0, total), items, b.clusterSize, b.out);
  } finally {
    giveInput(input, alignKey);
  }
}

/**
 * Input buffers kept for reuse, by memory alignment, in power-of-two sizes: a fresh
 * buffer per request would be garbage the size of the compressed data.
 */
const MAX_SPARE_INPUT_BYTES = 32 * 1024 * 1024;
const spareInput = new Map<number, Uint8Array[]>();
let spareInputBytes = 0;

/** A buffer of at least `bytes`; with `align` > 1 allocated by the file (aligned for O_DIRECT). */
function takeInput(bytes: number, align: number, file: GatedBackend): Uint8Array {
  const size = Math.max(64 * 1024, 2 ** Math.ceil(Math.log2(Math.max(1, bytes))));
  const list = spareInput.get(align);
  const i = list ? list.findIndex((b) => b.length === size) : -1;
  if (i >= 0) {
    spareInputBytes -= size;
    return list!.splice(i, 1)[0]!;
  }
  return align > 1 ? file.allocBuffer!(size) : new Uint8Array(size);
}

function giveInput(b: Uint8Array, align: number): void {
  if (spareInputBytes + b.length > MAX_SPARE_INPUT_BYTES) return;
  let list = spareInput.get(align);
  if (!list) spareInput.set(align, (list = []));
  list.push(b);
  spareInputBytes += b.length;
}

/**
 * Decompresses the clusters of a group of compressed data read in one piece
 * (trailing bytes after each stream allowed). Resolves with one cluster per item;
 * rejects with the first failing cluster's error only once every cluster settled.
 */
export async function decompressGroup(
  type: number,
  raw: Uint8Array,
  items: readonly CompressedItem[],
  clusterSize: number,
): Promise<DecompressedGroup> {
  const codec = await nativeCodec();
  if (codec) {
    const kind = kindName(type, items[0]);
    const spans = spansOf(kind, raw, items, clusterSize, (i) => i * clusterSize);
    const output = takeScratch(items.length * clusterSize);
    try {
      await codec.decompressBatch({ kind, clusterSize, input: raw, spans, output });
    } catch (err) {
      giveScratch(output);
      throw batchError(kind, items, err);
    }
    let released = false;
    return {
      clusters: items.map((_, i) => output.subarray(i * clusterSize, (i + 1) * clusterSize)),
      release: () => {
        if (!released) {
          released = true;
          giveScratch(output);
        }
      },
    };
  }
  if (type === COMPRESSION_ZLIB) {
    const results = await Promise.allSettled(
      items.map((item) => inflateCluster(raw.subarray(item.start, item.end), clusterSize, item)),
    );
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    return { clusters: results.map((r) => (r as PromiseFulfilledResult<Uint8Array>).value), release: noop };
  }
  if (type === COMPRESSION_ZSTD) {
    const frames: number[] = [];
    for (const item of items)
      frames.push(item.start, zstdFrameLength(raw.subarray(item.start, item.end), clusterSize, item));
    let batch: ZstdBatch;
    try {
      batch = await zstdPool().decompressBatch(raw, frames, clusterSize);
    } catch (err) {
      const item = items[err instanceof ZstdBatchError ? err.index : 0]!;
      throw bad(item, `zstd: ${(err as Error).message}`, err);
    }
    return {
      clusters: items.map((_, i) => batch.clusters.subarray(i * clusterSize, (i + 1) * clusterSize)),
      release: batch.release,
    };
  }
  throw new BlockError('ENOTSUP', `unknown compression type ${type}`, { location: items[0]?.location, op: 'read' });
}

function inflateCluster(src: Uint8Array, clusterSize: number, ref: CompressedRef): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    // SYNC_FLUSH: a stream may end exactly where the cluster ends without its final
    // block marker (QEMU accepts that); the length check below decides.
    inflateRaw(
      src,
      { finishFlush: zc.Z_SYNC_FLUSH, maxOutputLength: clusterSize, chunkSize: Math.max(clusterSize, 64) },
      (err, out) => {
        if (err) {
          const why =
            (err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE'
              ? `decompresses to more than ${clusterSize} bytes`
              : err.message;
          reject(bad(ref, `zlib: ${why}`, err));
        } else if (out.length !== clusterSize) {
          reject(bad(ref, `zlib: decompresses to ${out.length} bytes, expected ${clusterSize}`));
        } else {
          resolve(out);
        }
      },
    );
  });
}

/**
 * Length of the zstd frame at the start of `src`, walking its block headers
 * (RFC 8878). Refuses what QEMU's frames never have and what could make the
 * decompressor allocate too much: dictionaries, a window over MAX_ZSTD_WINDOW, a
 * declared content size other than one cluster, reserved block types.
 */
export function zstdFrameLength(src: Uint8Array, clusterSize: number, ref: CompressedRef): number {
  const need = (n: number): void => {
    if (n > src.length) throw bad(ref, `zstd: frame truncated (needs ${n} bytes, the descriptor covers ${src.length})`);
  };
  need(6);
  const magic = (src[0]! | (src[1]! << 8) | (src[2]! << 16) | (src[3]! << 24)) >>> 0;
  if (magic !== ZSTD_MAGIC) throw bad(ref, 'zstd: bad frame magic');
  const fhd = src[4]!;
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  if (fhd & 0x08) throw bad(ref, 'zstd: reserved frame header bit set');
  const checksum = (fhd >> 2) & 1;
  const dictBytes = [0, 1, 2, 4][fhd & 3]!;
  let p = 5;
  let window = 0;
  if (!singleSegment) {
    const wd = src[p++]!;
    const base = 2 ** (10 + (wd >> 3));
    window = base + (base / 8) * (wd & 7);
  }
  need(p + dictBytes);
  let dictId = 0;
  for (let i = 0; i < dictBytes; i++) dictId += src[p + i]! * 2 ** (8 * i);
  p += dictBytes;
  if (dictId !== 0) throw bad(ref, 'zstd: frame needs a dictionary');
  const fcsBytes = fcsFlag === 0 ? singleSegment : 1 << fcsFlag;
  need(p + fcsBytes);
  if (fcsBytes > 0) {
    let fcs = 0;
    for (let i = 0; i < fcsBytes; i++) fcs += src[p + i]! * 2 ** (8 * i);
    if (fcsBytes === 2) fcs += 256;
    if (fcs !== clusterSize) throw bad(ref, `zstd: frame content size ${fcs} is not the cluster size ${clusterSize}`);
    if (singleSegment) window = fcs;
  }
  p += fcsBytes;
  if (window > MAX_ZSTD_WINDOW) throw bad(ref, `zstd: window of ${window} bytes is too large`);
  const maxBlock = Math.min(window, ZSTD_MAX_BLOCK);
  for (;;) {
    need(p + 3);
    const bh = src[p]! | (src[p + 1]! << 8) | (src[p + 2]! << 16);
    const last = bh & 1;
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    if (type === 3) throw bad(ref, 'zstd: reserved block type');
    if (size > maxBlock) throw bad(ref, `zstd: block of ${size} bytes exceeds the maximum ${maxBlock}`);
    p += 3 + (type === 1 ? 1 : size);
    need(p);
    if (last) break;
  }
  if (checksum) {
    p += 4;
    need(p);
  }
  return p;
}
