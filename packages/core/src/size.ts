/** Sizes as qemu-img writes them: a number with an optional binary suffix (k, M, G, T, P, E). */
import { BlockError } from './errors.js';

const UNITS = 'bkmgtpe';

export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe])?(?:i?b)?\s*$/i.exec(text);
  if (!m)
    throw new BlockError(
      'EINVAL',
      `invalid ${what} "${text}": expected a number with an optional suffix k, M, G, T, P, E (powers of 1024)`,
    );
  const unit = m[2] ? UNITS.indexOf(m[2].toLowerCase()) : 0;
  const value = Number(m[1]) * 1024 ** unit;
  if (!Number.isSafeInteger(value))
    throw new BlockError('EINVAL', `invalid ${what} "${text}": not a whole number of bytes below 2^53`);
  return value;
}

/** "1.5 GiB"-style text for humans. */
export function formatSize(bytes: number): string {
  const names = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < names.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0
    ? `${bytes} B`
    : `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0).replace(/\.0+$|(\.\d*?)0+$/, '$1')} ${names[i]}`;
}
