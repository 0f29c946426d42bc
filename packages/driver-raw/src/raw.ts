/**
 * The "raw" format: image bytes are the protocol object's bytes. The backend is a
 * pass-through whose only jobs are to report driverName "raw" and to honour a
 * read-only open on top of a writable file.
 */
import {
  BLOCK_API_VERSION,
  BlockError,
  type BlockBackend,
  type BlockLimits,
  type Extent,
  type FormatDriver,
  type OpenOptions,
  type WriteFlags,
  type WriteZeroesFlags,
} from '@blockconv/core';

export class RawBackend implements BlockBackend {
  readonly driverName = 'raw';
  readonly location: string;
  readonly size: number;
  readonly readOnly: boolean;
  readonly limits: BlockLimits;
  readonly canWriteZeroes: boolean;
  readonly canDiscard: boolean;
  readonly readsZeroesInitially: boolean;
  readonly canCompress = false;
  readonly hasBlockStatus: boolean;
  readonly cheapHoleReads: boolean;
  readonly canWriteOutOfOrder: boolean;
  // Optional members exist only when the file has them: the core tests for presence.
  readonly allocBuffer?: (size: number) => Uint8Array;
  readonly writeSegments?: (offset: number, data: Uint8Array, segments: Float64Array, count: number) => Promise<void>;
  readonly readSegments?: (into: Uint8Array, segments: Float64Array, count: number) => Promise<void>;
  readonly allocatedSize?: () => Promise<number | undefined>;
  readonly #file: BlockBackend;

  constructor(file: BlockBackend, readOnly = false) {
    this.#file = file;
    this.location = file.location;
    this.size = file.size;
    this.readOnly = file.readOnly || readOnly;
    this.limits = file.limits;
    this.canWriteZeroes = file.canWriteZeroes;
    this.canDiscard = file.canDiscard;
    this.readsZeroesInitially = file.readsZeroesInitially;
    this.hasBlockStatus = file.hasBlockStatus;
    this.cheapHoleReads = file.cheapHoleReads ?? false;
    this.canWriteOutOfOrder = file.canWriteOutOfOrder ?? true;
    if (file.allocBuffer) this.allocBuffer = file.allocBuffer.bind(file);
    if (file.allocatedSize) this.allocatedSize = file.allocatedSize.bind(file);
    if (file.readSegments) this.readSegments = file.readSegments.bind(file);
    const writeSegments = file.writeSegments?.bind(file);
    if (writeSegments) {
      this.writeSegments = (offset, data, segments, count) =>
        this.#refuse('write', offset) ?? writeSegments(offset, data, segments, count);
    }
  }

  // Methods return the file's promises as they are: no extra await per request.
  read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    return this.#file.read(offset, length, into);
  }

  write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    return this.#refuse('write', offset) ?? this.#file.write(offset, data, flags);
  }

  writeZeroes(offset: number, length: number, flags?: WriteZeroesFlags): Promise<void> {
    return this.#refuse('writeZeroes', offset) ?? this.#file.writeZeroes(offset, length, flags);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.#refuse('discard', offset) ?? this.#file.discard(offset, length);
  }

  blockStatus(offset: number, length: number): Promise<Extent> {
    return this.#file.blockStatus(offset, length);
  }

  flush(): Promise<void> {
    return this.#file.flush();
  }

  close(): Promise<void> {
    return this.#file.close();
  }

  /** Raw has no format-specific details. */
  async info(): Promise<Record<string, unknown>> {
    return {};
  }

  #refuse(op: string, offset: number): Promise<never> | undefined {
    if (!this.readOnly) return undefined;
    return Promise.reject(new BlockError('EROFS', 'image is read-only', { op, location: this.location, offset }));
  }
}

export const rawDriver: FormatDriver = {
  apiVersion: BLOCK_API_VERSION,
  kind: 'format',
  name: 'raw',
  description: 'raw disk image: the bytes as they are',
  // Anything is a valid raw image, so claim the least confidence: any real format wins.
  probe: () => 1,
  async open(file: BlockBackend, options: OpenOptions): Promise<BlockBackend> {
    return new RawBackend(file, options.readOnly === true);
  },
  // The protocol object already has the image's size and reads as zeroes.
  async create(): Promise<void> {},
  protocolSizeFor: (size: number) => size,
};
