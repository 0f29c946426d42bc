/**
 * Batch compression and decompression of qcow2 clusters (QEMU's block/qcow2-threads.c
 * formats) on the libuv thread pool, with the system's libdeflate, zlib and libzstd.
 *
 * A batch is many clusters at once: the caller gives one input buffer, one output
 * buffer and, per cluster, where its bytes are in each (a Float64Array of offsets).
 * The batch runs as one or a few thread-pool jobs (split by size, see `jobs`), which
 * write straight into the caller's output: nothing is allocated per cluster. Buffers
 * must stay untouched until the promise settles, and output ranges must not overlap
 * each other or the input.
 *
 * Decompression of 'zlib' and 'zstd' produces exactly one cluster per input, which may
 * carry bytes after the stream (qcow2 descriptors are rounded to sectors). 'rfc1950' is
 * for other formats' grains: a zlib stream of at most a cluster, its length reported.
 * Compression stores a cluster compressed only when the result is smaller than the
 * cluster (QEMU: at most cluster_size - 1 bytes); otherwise its length is
 * STORE_UNCOMPRESSED. See README.md for each kind's exact contract.
 *
 * Failures reject with a CodecError naming the first failing cluster (`index`, in
 * the batch) and why; a corrupt input is `code` 'ECORRUPT'. Bad arguments reject
 * with a TypeError or RangeError.
 */
import { createRequire } from 'node:module';

/**
 * - 'zlib': raw deflate (RFC 1951) of exactly one cluster, as qcow2 stores it (the name is QEMU's);
 * - 'zstd': one zstd frame of exactly one cluster (qcow2's compression_type=zstd);
 * - 'rfc1950': a zlib stream (RFC 1950: header, deflate, adler32) of at most one cluster,
 *   e.g. a VMDK streamOptimized grain; decompression only.
 */
export type CodecKind = 'zlib' | 'zstd' | 'rfc1950';

/** compressBatch's length for a cluster that does not shrink: store it uncompressed. */
export const STORE_UNCOMPRESSED = -1;

/** A batch failed: `index` is the first failing cluster's position in the batch. */
export interface CodecError extends Error {
  /** 'ECORRUPT' (bad compressed data), 'ENOMEM' (no codec context), 'EIO' (compression failed). */
  readonly code: 'ECORRUPT' | 'ENOMEM' | 'EIO';
  readonly index: number;
  /** Why, without the cluster number: "decompresses to 4096 bytes, expected 65536". */
  readonly reason: string;
}

export interface DecompressBatch {
  readonly kind: CodecKind;
  /**
   * Cluster size: a power of two from 512 B to 2 MiB. Every 'zlib' and 'zstd' cluster
   * decompresses to exactly this; an 'rfc1950' stream to at most this.
   */
  readonly clusterSize: number;
  readonly input: Uint8Array;
  /**
   * Three numbers per cluster: offset of its compressed bytes in `input`, their length
   * (trailing bytes after the stream allowed), offset of its `clusterSize` bytes in `output`.
   */
  readonly spans: Float64Array;
  /** Clusters in the batch; default spans.length / 3. */
  readonly count?: number;
  readonly output: Uint8Array;
  /**
   * Receives per cluster the bytes decompressed into its slot: always clusterSize for
   * 'zlib' and 'zstd', the stream's length for 'rfc1950', which requires it. Bytes of a
   * slot past its length are unspecified.
   */
  readonly lengths?: Int32Array;
  /** Most thread-pool jobs to split the batch into (default 4; fewer for small batches). */
  readonly jobs?: number;
}

export interface CompressBatch {
  /** 'zlib' or 'zstd': 'rfc1950' is refused with a TypeError (decompression only). */
  readonly kind: CodecKind;
  /** Cluster size: a power of two from 512 B to 2 MiB. Every input is one whole cluster. */
  readonly clusterSize: number;
  readonly input: Uint8Array;
  /** Two numbers per cluster: offset of the cluster in `input`, offset of its slot of clusterSize - 1 bytes in `output`. */
  readonly spans: Float64Array;
  /** Clusters in the batch; default spans.length / 2. */
  readonly count?: number;
  readonly output: Uint8Array;
  /** Receives per cluster the compressed length (1 to clusterSize - 1) or STORE_UNCOMPRESSED. */
  readonly lengths: Int32Array;
  /** Most thread-pool jobs to split the batch into (default 4; fewer for small batches). */
  readonly jobs?: number;
}

interface Native {
  decompress(
    kind: number,
    clusterSize: number,
    input: Uint8Array,
    spans: Float64Array,
    first: number,
    count: number,
    output: Uint8Array,
    lengths?: Int32Array,
  ): Promise<void>;
  compress(
    kind: number,
    clusterSize: number,
    input: Uint8Array,
    spans: Float64Array,
    first: number,
    count: number,
    output: Uint8Array,
    lengths: Int32Array,
  ): Promise<void>;
  readonly versions: { readonly libdeflate: string; readonly zstd: string; readonly zlib: string };
}

// An ESM module cannot import a .node file; createRequire can. src/ (tsx) and dist/
// (built) both sit beside build/. A missing addon (no -dev libraries at install time)
// does not fail the import: `available` says so, and calls reject with loadError.
let native: Native | undefined;
/** Why the addon could not be loaded, when it could not. */
export let loadError: Error | undefined;
try {
  native = createRequire(import.meta.url)('../build/Release/codec.node') as Native;
} catch (err) {
  loadError = new Error(
    `the @blockconv/codec addon is not built (it needs libdeflate, libzstd and zlib, Debian: libdeflate-dev libzstd-dev zlib1g-dev; then \`npm rebuild @blockconv/codec\`): ${(err as Error).message}`,
    { cause: err },
  );
}

/** Whether the native addon loaded. */
export const available: boolean = native !== undefined;

/** Versions of the libraries the addon runs with, when it loaded. */
export const versions: Native['versions'] | undefined = native?.versions;

const KINDS: Record<CodecKind, number> = { zlib: 0, zstd: 1, rfc1950: 2 };
const DEFAULT_JOBS = 4;
/** Smallest share of a batch worth its own job: decompressing 512 KiB takes ~0.5 ms, compressing 128 KiB about as long. */
const MIN_DECOMPRESS_JOB_BYTES = 512 * 1024;
const MIN_COMPRESS_JOB_BYTES = 128 * 1024;

function addon(): Native {
  if (!native) throw loadError!;
  return native;
}

function kindOf(kind: CodecKind): number {
  const k = Object.hasOwn(KINDS, kind) ? KINDS[kind] : undefined;
  if (k === undefined) throw new TypeError(`unknown codec kind ${JSON.stringify(kind)} (zlib, zstd or rfc1950)`);
  return k;
}

function lengthsOf(lengths: Int32Array | undefined, count: number): void {
  if (lengths && lengths.length < count)
    throw new RangeError(`lengths holds ${lengths.length} entries, the batch has ${count} clusters`);
}

function countOf(count: number | undefined, spans: Float64Array, stride: number): number {
  const n = count ?? spans.length / stride;
  if (!Number.isSafeInteger(n) || n < 0 || n * stride > spans.length)
    throw new RangeError(`count ${n} does not match ${spans.length} span numbers`);
  return n;
}

/** Runs `count` clusters as up to `jobs` thread-pool jobs; the lowest failing index wins. */
async function split(
  count: number,
  clusterSize: number,
  jobs: number | undefined,
  minBytes: number,
  run: (first: number, n: number) => Promise<void>,
): Promise<void> {
  if (count === 0) return;
  const byBytes = Math.ceil((count * clusterSize) / minBytes);
  const parts = Math.max(1, Math.min(jobs ?? DEFAULT_JOBS, byBytes, count));
  const per = Math.ceil(count / parts);
  const pending: Array<Promise<void>> = [];
  let refused: { err: unknown } | undefined;
  try {
    for (let first = 0; first < count; first += per) pending.push(run(first, Math.min(per, count - first)));
  } catch (err) {
    refused = { err }; // bad arguments of a later job: the earlier ones still use the buffers
  }
  const results = await Promise.allSettled(pending);
  if (refused) throw refused.err;
  let worst: PromiseRejectedResult | undefined;
  for (const r of results) {
    if (r.status === 'rejected' && (!worst || indexOf(r.reason) < indexOf(worst.reason))) worst = r;
  }
  if (worst) throw worst.reason;
}

function indexOf(err: unknown): number {
  const i = (err as { index?: unknown } | null)?.index;
  return typeof i === 'number' ? i : Infinity;
}

/**
 * Decompresses a batch of clusters into `output`. Resolves once every cluster is
 * written; rejects with a CodecError naming the first cluster that failed (the
 * contents of the others are then unspecified).
 */
export async function decompressBatch(batch: DecompressBatch): Promise<void> {
  const n = addon();
  const kind = kindOf(batch.kind);
  const count = countOf(batch.count, batch.spans, 3);
  const { clusterSize, input, spans, output, lengths } = batch;
  if (batch.kind === 'rfc1950' && !lengths)
    throw new TypeError('rfc1950 streams may be short: decompressBatch needs `lengths` to say how long');
  lengthsOf(lengths, count);
  await split(count, clusterSize, batch.jobs, MIN_DECOMPRESS_JOB_BYTES, (first, c) =>
    n.decompress(kind, clusterSize, input, spans, first, c, output, lengths),
  );
}

/**
 * Compresses a batch of whole clusters as QEMU does (zlib: raw deflate, default level,
 * 4 KiB window, memLevel 9; zstd: default parameters, one frame) into slots of
 * `output`, and resolves with `lengths` filled: the compressed size, or
 * STORE_UNCOMPRESSED when it would not be smaller than the cluster.
 */
export async function compressBatch(batch: CompressBatch): Promise<Int32Array> {
  const n = addon();
  if (batch.kind === 'rfc1950')
    throw new TypeError('rfc1950 is a decompression kind only (node:zlib deflateSync writes zlib streams)');
  const kind = kindOf(batch.kind);
  const count = countOf(batch.count, batch.spans, 2);
  const { clusterSize, input, spans, output, lengths } = batch;
  lengthsOf(lengths, count);
  await split(count, clusterSize, batch.jobs, MIN_COMPRESS_JOB_BYTES, (first, c) =>
    n.compress(kind, clusterSize, input, spans, first, c, output, lengths),
  );
  return lengths;
}
