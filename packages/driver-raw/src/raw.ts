/**
 * The "raw" format: image bytes are the protocol object's bytes. The backend is the
 * file's own, forwarded whole, that reports driverName "raw" and honours a read-only
 * open on top of a writable file.
 */
import { BLOCK_API_VERSION, BlockError, forwardBackend, type BlockBackend, type FormatDriver, type OpenOptions } from '@blockconv/core';

/** A raw image: its protocol backend under the name "raw". */
export type RawBackend = BlockBackend;

function openRaw(file: BlockBackend, options: OpenOptions): RawBackend {
  const readOnly = file.readOnly || options.readOnly === true;
  const refuse = (op: string) => (offset: number): Promise<never> =>
    Promise.reject(new BlockError('EROFS', 'image is read-only', { op, location: file.location, offset }));
  return forwardBackend(file, {
    driverName: 'raw',
    readOnly,
    /** Raw has no format-specific details. */
    info: async () => ({}),
    // Writes through a writable file would bypass the read-only open: refuse them here.
    ...(readOnly && !file.readOnly
      ? { write: refuse('write'), writeZeroes: refuse('writeZeroes'), discard: refuse('discard'), writeSegments: refuse('write') }
      : {}),
  });
}

export const rawDriver: FormatDriver = {
  apiVersion: BLOCK_API_VERSION,
  kind: 'format',
  name: 'raw',
  description: 'raw disk image: the bytes as they are',
  // Anything is a valid raw image, so claim the least confidence: any real format wins.
  probe: () => 1,
  async open(file: BlockBackend, options: OpenOptions): Promise<BlockBackend> {
    return openRaw(file, options);
  },
  // The protocol object already has the image's size and reads as zeroes.
  async create(): Promise<void> {},
  protocolSizeFor: (size: number) => size,
};
