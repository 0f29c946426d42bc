/**
 * The CLI's last line of defence: while a command runs, everything written to stdout
 * and stderr passes through core's redactCredentials. Locations are redacted where
 * they are made (drivers, BlockError, the commands' own output); this catches what a
 * third-party driver, a native library or a dependency prints past them. Writes hold
 * whole lines (map and progress write complete lines), so no URL is split between two.
 */
import { redactCredentials } from '@blockconv/core';

/** Filters the streams' string writes (blockconv writes text only); returns the undo. */
export function redactStreams(streams: readonly NodeJS.WriteStream[] = [process.stdout, process.stderr]): () => void {
  const undo = streams.map((stream) => {
    const write = stream.write;
    stream.write = function (this: NodeJS.WriteStream, chunk: unknown, ...rest: unknown[]) {
      return (write as (...args: unknown[]) => boolean).call(
        this,
        typeof chunk === 'string' ? redactCredentials(chunk) : chunk,
        ...rest,
      );
    } as typeof stream.write;
    return () => {
      stream.write = write;
    };
  });
  return () => {
    for (const f of undo) f();
  };
}
