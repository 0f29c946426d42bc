/**
 * The "raw" format: image bytes are the protocol object's bytes. The backend is the
 * file's own, forwarded whole, that reports driverName "raw" and is read-only when
 * opened so on top of a writable file (the core's request gate then refuses writes).
 */
import {
  BLOCK_API_VERSION,
  forwardBackend,
  type BlockBackend,
  type FormatDriver,
  type OpenOptions,
} from '@blockconv/core';

/** A raw image: its protocol backend under the name "raw". */
export type RawBackend = BlockBackend;

function openRaw(file: BlockBackend, options: OpenOptions): RawBackend {
  return forwardBackend(file, {
    driverName: 'raw',
    readOnly: file.readOnly || options.readOnly === true,
    /** Raw has no format-specific details. */
    info: async () => ({}),
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
