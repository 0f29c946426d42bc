/**
 * Pre-zeroing, as qemu-img convert does with BDRV_REQ_NO_FALLBACK: a target that may hold
 * old data but can zero itself at metadata speed (canFastZero: an NBD export with fast
 * zero) is zeroed whole before the copy, so that its zero extents are skipped instead of
 * written one by one. A fast zero the target turns down (ENOTSUP) changes nothing: the copy
 * then writes zeroes as usual.
 */
import type { GatedBackend } from '../types.js';

/** Zeroes [0, length) of `target` if it can do so fast; true when it did. */
export async function preZero(target: GatedBackend, length: number): Promise<boolean> {
  if (!target.canFastZero || target.zeroInitialized || target.readOnly || length === 0) return false;
  try {
    await target.writeZeroes(0, length, { mayUnmap: true, fast: true });
    return true;
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOTSUP') return false;
    throw err;
  }
}
