/**
 * How a command fails. A thrown error becomes one line on stderr and exit 1 (main.ts);
 * ExitError chooses the code (compare's 2, check's 3 or 63) and may say nothing more.
 */
import { redactCredentials } from '@blockconv/core';

/** Exit codes: 0 success, 1 failure (compare: images differ), 2 compare error, 130/143 signals. */
export class ExitError extends Error {
  constructor(
    readonly exitCode: number,
    message: string,
  ) {
    super(message);
  }
}

/** One line for the user; the stack only when debugging. */
export function describe(err: unknown, debug: boolean): string {
  if (debug && err instanceof Error && err.stack) {
    let s = err.stack;
    for (let c = (err as { cause?: unknown }).cause; c instanceof Error; c = (c as { cause?: unknown }).cause)
      s += `\ncaused by: ${c.stack ?? c.message}`;
    return redactCredentials(s);
  }
  return redactCredentials(err instanceof Error ? err.message.split('\n')[0]! : String(err));
}
