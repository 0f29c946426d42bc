/**
 * The driver interface: what every storage back end implements and what the core
 * (scheduler, compare, CLI) relies on. Modelled on nbdkit's plugin API (small
 * operations plus capability flags) and QEMU's BlockLimits (limits are data the
 * core enforces, so drivers never re-check them).
 */
import type { SegmentList } from './segments.js';

/** Version of this interface; a driver states which one it was written against. */
export const BLOCK_API_VERSION = 2;

/** Versions this core loads: 2 as it is, 1 through the adapter in compat/api1.ts. */
export const SUPPORTED_API_VERSIONS: readonly number[] = [1, 2];

/**
 * Request limits of a backend. The core's request gate splits and pads every request
 * so that a driver only ever sees requests that respect them: inside the image, the
 * offset a multiple of requestAlignment and the length too (or reaching the image's
 * end), at most maxTransfer (maxWriteZeroes for writeZeroes and discard), and no
 * change to a read-only or closed backend.
 */
export interface BlockLimits {
  /** Offsets and lengths of read/write/zero/discard are multiples of this (bytes, power of two). */
  readonly requestAlignment: number;
  /** Largest read or write in one call. */
  readonly maxTransfer: number;
  /**
   * Preferred request size for throughput, a hint for callers that choose their own
   * sizes (at most maxTransfer). Convert does not use it: its chunks are its buffer size.
   */
  readonly optimalTransfer?: number;
  /** Largest writeZeroes/discard in one call. Defaults to maxTransfer when absent. */
  readonly maxWriteZeroes?: number;
  /** Required alignment of the memory of I/O buffers (O_DIRECT); 1 when any will do. */
  readonly minMemAlignment?: number;
  /**
   * Writes aligned to this (a power of two, a multiple of requestAlignment) spare the
   * driver a read-modify-write or copy-on-write, e.g. qcow2's cluster size. Convert
   * cuts its chunks and finds zero runs on this granularity (QEMU's
   * pwrite_zeroes_alignment plays this part in qemu-img convert).
   */
  readonly preferredAlignment?: number;
  /** Compressed writes (WriteFlags.compress) cover whole blocks of this size: qcow2's cluster. */
  readonly compressionUnit?: number;
}

/** What a range of an image holds, as block status reports it. */
export type ExtentKind =
  /** Allocated in this layer: must be read. */
  | 'data'
  /** Reads as zeroes, whatever any backing image holds. */
  | 'zero'
  /** Not allocated in this layer: reads through to the backing image (zeroes when there is none). */
  | 'unallocated';

/**
 * The first extent at the asked offset. `length` may run past the asked range (a
 * hint, as in QEMU and nbdkit) but never past the end of the image, and is never 0.
 */
export interface Extent {
  readonly kind: ExtentKind;
  readonly length: number;
  /** Where the extent's bytes live in the layer below (the host file), for `map`; when known. */
  readonly offset?: number;
}

export interface WriteFlags {
  /** Force unit access: the data is on stable storage when the call resolves. */
  readonly fua?: boolean;
  /**
   * Store compressed where that saves space (canCompress backends; qemu-img -c). The
   * request covers whole limits.compressionUnit blocks, the image's end aside.
   */
  readonly compress?: boolean;
}

export interface WriteZeroesFlags {
  /** The range may be deallocated instead of written, as long as it then reads as zeroes. */
  readonly mayUnmap?: boolean;
  /**
   * Only if it is fast (metadata, not data): a backend that would have to write zeroes
   * rejects with ENOTSUP at once instead. Sent only to canFastZero backends (the gate
   * refuses it elsewhere); NBD's FAST_ZERO, QEMU's BDRV_REQ_NO_FALLBACK.
   */
  readonly fast?: boolean;
}

/**
 * One data chunk of a convert that a source and target pair may copy in a step of their
 * own (BlockBackend.copyTo on the source, copyFrom on the target), instead of the core
 * reading it into its buffer and writing it out. Two kinds of step share the hooks:
 * - `offload` true (-C): the storage copies the bytes itself (copy_file_range between
 *   local files, a server-side copy); nothing passes through the process, nothing is
 *   scanned, `zeroRuns` stays empty.
 * - `offload` false: a fused copy; the pair reads the chunk into `buffer`, finds its
 *   zero runs as the core's ZeroScanner does (whole `unit`s, runs of at least `minRun`,
 *   `holes` counted as runs unread), writes the data and leaves the zero runs, not
 *   written, in `zeroRuns` for the caller to zero or skip (two local files: one
 *   thread-pool job, where a read, a scan and a write cost three hand-offs).
 * The caller owns the request and reuses it from chunk to chunk.
 */
export interface CopyRequest {
  readonly offload: boolean;
  /** The caller's buffer, at least the chunk's length (aligned as the pair's limits ask). */
  readonly buffer: Uint8Array;
  /**
   * Holes of the chunk the source reported: source offsets, lengths, positions in the
   * chunk, on whole units. Zero runs, never read. Empty without a zero scan.
   */
  readonly holes: SegmentList;
  /** The zero scan: runs are whole units of `unit` bytes and at least `minRun` long; minRun 0 scans nothing. */
  readonly unit: number;
  readonly minRun: number;
  /**
   * Filled by the source half: where the chunk's bytes lie in the layer it hands to the
   * target (offset there, length, position in the chunk). Room for holes + 1 pieces.
   */
  readonly pieces: SegmentList;
  /**
   * Filled by the target half: the zero runs found (target offsets, lengths, positions
   * in the chunk), the holes among them; these were not written. Room for a run per
   * unit, plus the holes.
   */
  readonly zeroRuns: SegmentList;
  /**
   * The target half calls this once, when the step is under way and can no longer be
   * declined (convert then lets the next chunk issue its writes, keeping write order).
   */
  readonly issued: () => void;
}

/**
 * An opened image: a protocol (file, nfs, iscsi) or a format (raw, qcow2) on top of one.
 * What a driver implements. Only the members without `?` are required: a capability
 * defaults to "the method exists" (nbdkit's rule), and the request gate (gate.ts),
 * which every backend the registry opens sits behind, fills in the rest (see
 * GatedBackend). A read-only image needs no write methods at all.
 */
export interface BlockBackend {
  /** The driver that opened it, e.g. "file" or "raw". */
  readonly driverName: string;
  /**
   * Where it lives, for messages. Never contains credentials: drivers redact it
   * (redactLocation), and the registry redacts what a driver left in.
   */
  readonly location: string;
  /** Virtual size in bytes. */
  readonly size: number;
  /** Refuses every change. Default: true when there is no write(), else false. */
  readonly readOnly?: boolean;
  /** Why the image is read-only when that is not the caller's choice (e.g. "marked corrupt"), for messages. */
  readonly readOnlyReason?: string;
  /**
   * Limits as data: the request gate splits and pads every request to fit them, so the
   * driver never checks them itself.
   */
  readonly limits: BlockLimits;

  // Capabilities: what the backend can do, each defaulting as its comment says.

  /** writeZeroes is cheaper than writing a buffer of zeroes. Default: writeZeroes exists. */
  readonly canZero?: boolean;
  /**
   * writeZeroes takes `fast` (nbdkit's can_fast_zero): convert then zeroes a target that
   * may hold old data in one go before copying, and skips its zero extents (qemu-img's
   * pre-zeroing). Default false.
   */
  readonly canFastZero?: boolean;
  /** discard deallocates. Default: discard exists (without it, discard is a no-op). */
  readonly canDiscard?: boolean;
  /** Writes may be stored compressed (WriteFlags.compress, qemu-img convert -c). Default false. */
  readonly canCompress?: boolean;
  /** blockStatus tells real allocation. Default: blockStatus exists (without it, all is data). */
  readonly canBlockStatus?: boolean;
  /**
   * Reading a zero extent costs no real I/O (the kernel or the driver fills zeroes, as
   * for holes in local files): convert may then read small holes along with the data
   * around them, saving requests. False (the default) for anything that moves the
   * zeroes over a wire.
   */
  readonly canReadHolesCheaply?: boolean;
  /**
   * Writes may overlap and complete in any order (-W). false: the target needs each write
   * to finish before the next starts (a stream, say); convert then sends them one by one.
   * Default true.
   */
  readonly canWriteOutOfOrder?: boolean;
  /**
   * Every byte not yet written reads back as zero (QEMU's has_zero_init): a thin LUN that
   * reports LBPRZ and is wholly unmapped, or anything a create() just made and said so
   * (the registry sets it on the backend it returns). Convert then skips zeroes. Default false.
   */
  readonly zeroInitialized?: boolean;
  /** The image this one reads through to for unallocated extents, if any. */
  readonly backing?: BlockBackend;

  /**
   * Reads `length` bytes at `offset`. Reads into `into` when given (it must hold at
   * least `length` bytes) and returns the filled view of it.
   */
  read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array>;
  /**
   * Optional vectored read: reads each segment's bytes at its offset into `into` at its
   * position, as one request where the storage allows. A format driver uses it when one
   * guest range maps to many host runs. Each segment lies inside the image and respects
   * the limits; the caller may reuse the list once the call returns.
   */
  readSegments?(into: Uint8Array, segments: SegmentList): Promise<void>;
  /** Writes `data` at `offset`. Absent on read-only backends. */
  write?(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void>;
  /**
   * Optional vectored write, the mirror of readSegments: writes each segment's bytes of
   * `from`, taken at its position, to its offset, as one request where the storage
   * allows. Convert uses it for a chunk whose data is split by zero runs; a format
   * driver when one guest request lands in several host runs (new qcow2 clusters).
   * Segments respect the limits; the caller may reuse the list once the call returns.
   */
  writeSegments?(from: Uint8Array, segments: SegmentList): Promise<void>;
  /**
   * Optional copy step of a chunk, the source's half (QEMU's copy_range_from): copies
   * `length` bytes at `offset` to `targetOffset` of `target` as `request` says (an
   * offload or a fused copy). The source fills `request.pieces` with where the bytes lie
   * in the layer that reaches its storage (a format translates offsets to its file's)
   * and hands that layer to `target.copyFrom`. Resolves true once copied; false when
   * the pair cannot (another file system, a compressed cluster, a target without
   * copyFrom): then nothing was written to the target and `issued` was not called (the
   * buffer may have been used), and the caller reads and writes the chunk itself.
   */
  copyTo?(
    offset: number,
    length: number,
    target: BlockBackend,
    targetOffset: number,
    request: CopyRequest,
  ): Promise<boolean>;
  /**
   * Optional copy step, the target's half (QEMU's copy_range_to): copies the
   * `request.pieces` of `source` (the layer that reached its storage, not gated) to
   * `offset` of this image, `length` bytes in all, calling `request.issued()` as the
   * step starts. False, as copyTo, when it cannot take this source or request.
   */
  copyFrom?(offset: number, length: number, source: BlockBackend, request: CopyRequest): Promise<boolean>;
  /** Makes [offset, +length) read as zeroes. Absent: the gate writes zeroes (canZero false). */
  writeZeroes?(offset: number, length: number, flags?: WriteZeroesFlags): Promise<void>;
  /** Deallocates [offset, +length) (advisory). Absent: a no-op. */
  discard?(offset: number, length: number): Promise<void>;
  /** The extent at `offset`. Absent: the whole image is data. */
  blockStatus?(offset: number, length: number): Promise<Extent>;
  /** Makes completed writes durable. Absent: nothing to do (read-only or write-through backends). */
  flush?(): Promise<void>;
  close(): Promise<void>;
  /**
   * Changes the size (growable protocols: files, NFS files). A format driver that
   * allocates past the end of its file grows it with this, as QEMU's bdrv_truncate.
   */
  resize?(size: number): Promise<void>;

  /** Allocates an I/O buffer that satisfies minMemAlignment (only needed when it is > 1). */
  allocBuffer?(size: number): Uint8Array;
  /** Format-specific details for `info`, as JSON-friendly values. */
  info?(): Promise<Record<string, unknown>>;
  /** Bytes this image occupies on its storage, when known (`info`'s disk size). */
  allocatedSize?(): Promise<number | undefined>;
  /**
   * Which object this is and which version of it, when the storage can tell (a file's
   * device and inode, its mtime): a resumed convert refuses a source that changed or a
   * target that was replaced. Formats report their file's.
   */
  identity?(): Promise<BackendIdentity>;
}

/**
 * A backend behind the request gate: what the registry returns and what format drivers
 * receive as their file. Every capability is decided and every method is present (the
 * gate supplies what the driver left out), so callers never test for them.
 */
export interface GatedBackend extends BlockBackend {
  readonly readOnly: boolean;
  readonly canZero: boolean;
  readonly canFastZero: boolean;
  readonly canDiscard: boolean;
  readonly canCompress: boolean;
  readonly canBlockStatus: boolean;
  readonly canReadHolesCheaply: boolean;
  readonly canWriteOutOfOrder: boolean;
  readonly zeroInitialized: boolean;
  readonly backing?: GatedBackend;
  write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void>;
  writeZeroes(offset: number, length: number, flags?: WriteZeroesFlags): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  blockStatus(offset: number, length: number): Promise<Extent>;
  flush(): Promise<void>;
}

export interface BackendIdentity {
  /** Names the object itself, stable while it exists (e.g. "dev:ino"). */
  readonly id: string;
  /** Changes whenever its content is changed (e.g. the mtime in nanoseconds). */
  readonly version?: string;
}

/** Cache modes as qemu-img names them. */
export type CacheMode = 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';

export interface OpenOptions {
  readonly readOnly?: boolean;
  /** Host cache mode; "none"/"directsync" bypass the page cache (O_DIRECT). */
  readonly cache?: CacheMode;
  /** Driver-specific options (qemu-img's -o / -l key=value pairs). */
  readonly options?: Readonly<Record<string, string>>;
  readonly signal?: AbortSignal;
}

export interface CreateOptions {
  readonly cache?: CacheMode;
  /** Driver-specific creation options (qemu-img's -o key=value pairs). */
  readonly options?: Readonly<Record<string, string>>;
  readonly signal?: AbortSignal;
}

/**
 * What a create() knows about the object it made. The registry puts it into the backend
 * it returns (zeroInitialized), so no driver needs to remember what it created.
 */
export interface CreateResult {
  /** Every byte of the new object reads back as zero (a new sparse file, a qcow2 without backing). */
  readonly zeroInitialized?: boolean;
}

/** Describes one option a driver takes: creation options for `-o help`, open options for `drivers`. */
export interface OptionInfo {
  readonly name: string;
  readonly description: string;
  readonly default?: string;
  readonly values?: readonly string[];
}

/** The former name of OptionInfo. */
export type CreateOptionInfo = OptionInfo;

/**
 * Bytes that identify a format, for probing without a probe() and for loading a driver
 * package only for images it may claim: `bytes` (a string stands for its UTF-8 bytes)
 * at `offset` of the image.
 */
export interface FormatMagic {
  readonly offset: number;
  readonly bytes: Uint8Array | string;
}

interface DriverBase {
  /** The interface version the driver was written against: BLOCK_API_VERSION (1 still loads, through an adapter). */
  readonly apiVersion: typeof BLOCK_API_VERSION;
  /** Unique name, e.g. "file", "nfs", "raw", "qcow2". */
  readonly name: string;
  readonly description?: string;
  readonly createOptions?: readonly OptionInfo[];
  /**
   * The options open() takes in OpenOptions.options (the CLI's --source-opts, --target-opts,
   * --opts). The registry refuses a key that neither the protocol nor the format driver of
   * the image declares, and names the ones they do; absent means none.
   */
  readonly openOptions?: readonly OptionInfo[];
}

/** Reaches storage: a local file, an NFS file, an iSCSI LUN. */
export interface ProtocolDriver extends DriverBase {
  readonly kind: 'protocol';
  /** URL schemes it serves, e.g. ["nfs"]; "file" also serves plain paths. */
  readonly schemes: readonly string[];
  /**
   * The protocol only reads (an HTTP source, say): the registry opens its images
   * read-only whatever the caller asks, with a readOnlyReason that says so, and it cannot
   * create images; a convert to one fails with that reason.
   */
  readonly readOnly?: boolean;
  /**
   * Query parameters of its URLs whose values are secrets (any case), e.g.
   * ["target_password"]. Registering the driver declares them process-wide: their values
   * are then masked wherever a location is shown (redact.ts). A URL's user password
   * and parameters named like password, secret or token are masked without this.
   */
  readonly secretParameters?: readonly string[];
  open(location: string, options: OpenOptions): Promise<BlockBackend>;
  /** Creates (or truncates) the object at location with the given size. */
  create?(location: string, size: number, options: CreateOptions): Promise<void | CreateResult>;
}

/** Interprets the bytes of a protocol backend: raw, qcow2. */
export interface FormatDriver extends DriverBase {
  readonly kind: 'format';
  /**
   * Byte strings of which any one, found at its offset, claims an image for this
   * format (confidence 100, unless probe() answers). `magic` and `probe` may both be
   * given: the magic then only preselects, and probe() decides.
   */
  readonly magic?: readonly FormatMagic[];
  /** Confidence 0..100 that `head` (the first bytes, up to 4 KiB) is this format. */
  probe?(head: Uint8Array, location: string): number;
  /**
   * The format is only read (a format whose writer is not written yet): the registry
   * opens its images read-only, with a readOnlyReason that says so, and refuses to create one.
   */
  readonly readOnly?: boolean;
  /** Opens the format on top of `file`, which it then owns (closes it on close). */
  open(file: GatedBackend, options: OpenOptions & { readonly resolver?: ImageResolver }): Promise<BlockBackend>;
  /**
   * Writes a new empty image of `size` bytes into the (empty) `file`. Without a
   * zeroInitialized answer, the protocol's answer stands (right for raw).
   */
  create?(
    file: GatedBackend,
    size: number,
    options: CreateOptions & { readonly resolver?: ImageResolver },
  ): Promise<void | CreateResult>;
  /**
   * Size the protocol object needs before create() is called (raw: the image size;
   * formats that grow themselves: 0).
   */
  protocolSizeFor?(size: number, options: CreateOptions): number;
  /**
   * Checks the format's metadata in `file` (opened read-write when repairing) and
   * repairs what options.repair allows; does not close `file`.
   */
  check?(file: GatedBackend, options: CheckOptions): Promise<CheckResult>;
}

export type BlockDriver = ProtocolDriver | FormatDriver;

export interface CheckOptions {
  /** Repair what can be: "leaks" only, or "all" (refcounts too low as well), as qemu-img check -r. */
  readonly repair?: 'leaks' | 'all';
  readonly signal?: AbortSignal;
  /**
   * Opens what the image refers to (backing chain, external data file): qemu-img check
   * opens them too, and fails when one cannot be opened.
   */
  readonly resolver?: ImageResolver;
}

/** What a consistency check found, in qemu-img check's terms. */
export interface CheckResult {
  /** Inconsistencies that may corrupt data (e.g. a cluster in use with too low a refcount). */
  readonly corruptions: number;
  /** Space marked in use that nothing refers to: wasted, no harm to data. */
  readonly leaks: number;
  /** Parts that could not be checked (I/O errors, unreadable tables). */
  readonly checkErrors: number;
  readonly corruptionsFixed: number;
  readonly leaksFixed: number;
  /** One line per problem, as qemu-img check prints them. */
  readonly messages: readonly string[];
  readonly imageEndOffset?: number;
  readonly totalClusters?: number;
  readonly allocatedClusters?: number;
  readonly fragmentedClusters?: number;
  readonly compressedClusters?: number;
}

/** Opens further images by name, e.g. a format driver resolving its backing file. */
export interface ImageResolver {
  open(location: string, options?: OpenOptions & { readonly format?: string }): Promise<GatedBackend>;
  /** Creates an image and returns it opened read-write (a format's external data file). */
  create?(
    location: string,
    size: number,
    options?: CreateOptions & { readonly format?: string },
  ): Promise<GatedBackend>;
}
