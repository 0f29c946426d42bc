/** Open options that several drivers take, parsed one way for all. */
import { BlockError } from './errors.js';

/** `timeout=N` (whole seconds) of a driver's open options; `fallback` when absent. */
export function timeoutOption(
  location: string,
  options: Readonly<Record<string, string>> | undefined,
  fallback: number,
): number {
  const v = options?.timeout;
  if (v === undefined) return fallback;
  if (!/^\d+$/.test(v))
    throw new BlockError('EINVAL', `timeout=${v}: expected whole seconds`, { op: 'open', location });
  return Number(v);
}
