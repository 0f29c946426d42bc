/** Closing the images a command opened. */
import type { BlockBackend } from '@blockconv/core';

/** Closes every image given (undefined: one never opened), dropping errors of close. */
export async function closeAll(images: Array<BlockBackend | undefined>): Promise<void> {
  await Promise.all(images.map((i) => i?.close().catch(() => {})));
}
