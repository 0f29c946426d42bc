/**
 * Checks that a backend's limits (BlockLimits) are data the request gate can honour.
 */
import { BlockError } from './errors.js';
import type { BlockBackend } from './types.js';

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && Math.log2(n) % 1 === 0;
}

/**
 * Checks that a backend's limits are data the gate can honour; a driver that declares
 * nonsense fails at open with a message naming the field, not later with odd requests.
 */
export function checkLimits(b: BlockBackend): void {
  const l = b.limits;
  const bad = (field: string, why: string): never => {
    throw new BlockError('EINVAL', `driver "${b.driverName}" declares invalid limits: ${why}`, {
      op: 'open',
      location: b.location,
      field: `limits.${field}`,
    });
  };
  if (!l) bad('', 'no limits');
  if (!isPowerOfTwo(l.requestAlignment)) bad('requestAlignment', `${l.requestAlignment} is not a power of two`);
  if (
    !Number.isSafeInteger(l.maxTransfer) ||
    l.maxTransfer < l.requestAlignment ||
    l.maxTransfer % l.requestAlignment !== 0
  ) {
    bad('maxTransfer', `${l.maxTransfer} is not a positive multiple of requestAlignment (${l.requestAlignment})`);
  }
  if (
    l.optimalTransfer !== undefined &&
    (!Number.isSafeInteger(l.optimalTransfer) || l.optimalTransfer <= 0 || l.optimalTransfer > l.maxTransfer)
  ) {
    bad('optimalTransfer', `${l.optimalTransfer} is not between 1 and maxTransfer (${l.maxTransfer})`);
  }
  if (
    l.maxWriteZeroes !== undefined &&
    (!Number.isSafeInteger(l.maxWriteZeroes) || l.maxWriteZeroes < l.requestAlignment)
  ) {
    bad('maxWriteZeroes', `${l.maxWriteZeroes} is less than one block (${l.requestAlignment})`);
  }
  if (
    l.preferredAlignment !== undefined &&
    (!isPowerOfTwo(l.preferredAlignment) || l.preferredAlignment % l.requestAlignment !== 0)
  ) {
    bad(
      'preferredAlignment',
      `${l.preferredAlignment} is not a power of two and a multiple of requestAlignment (${l.requestAlignment})`,
    );
  }
  // A compression unit may be finer than the alignment (512-byte qcow2 clusters on O_DIRECT).
  if (l.compressionUnit !== undefined && (!isPowerOfTwo(l.compressionUnit) || l.compressionUnit > l.maxTransfer)) {
    bad('compressionUnit', `${l.compressionUnit} is not a power of two of at most maxTransfer (${l.maxTransfer})`);
  }
  const mem = l.minMemAlignment ?? 1;
  if (!isPowerOfTwo(mem)) bad('minMemAlignment', `${mem} is not a power of two`);
  if (mem > 1 && typeof b.allocBuffer !== 'function') bad('minMemAlignment', `${mem} needs allocBuffer()`);
  if (!Number.isSafeInteger(b.size) || b.size < 0) bad('size', `${b.size} is not a byte count`);
  if (b.readOnly === false && typeof b.write !== 'function') {
    throw new BlockError('EINVAL', `driver "${b.driverName}" declares a writable image without write()`, {
      op: 'open',
      location: b.location,
      field: 'write',
    });
  }
}
