/**
 * SIGINT and SIGTERM: as an AbortSignal for a long job (convert, checksum), with the exit
 * code each stands for; or as the cue for a server (worker, dashboard) to close.
 */

/** How long a stop at a checkpoint may wait for the writes in flight before the job is cancelled. */
const GRACEFUL_STOP_MS = 10_000;

export interface SignalAbort {
  readonly signal: AbortSignal;
  /** Stops listening for the signals. */
  dispose(): void;
  /** 130 after SIGINT, 143 after SIGTERM, else 1. */
  exitCode(): number;
  /** From now on, the first signal calls `stop` instead of aborting at once. */
  graceful(stop: (reason: Error) => void): void;
}

/**
 * SIGINT/SIGTERM cancel the job cleanly instead of killing the process mid-write. With
 * `graceful` set (a checkpointing convert), the first signal stops at a checkpoint: the
 * writes in flight finish and a last checkpoint is saved (cancelled anyway after
 * GRACEFUL_STOP_MS); a second signal cancels at once.
 */
export function signalAbort(): SignalAbort {
  const ac = new AbortController();
  let code = 1;
  let graceful: ((reason: Error) => void) | undefined;
  let stopping = false;
  const on = (sig: NodeJS.Signals, c: number) => {
    const h = (): void => {
      code = c;
      const reason = new Error(`interrupted by ${sig}`);
      if (graceful && !stopping) {
        stopping = true;
        graceful(reason);
        setTimeout(() => ac.abort(reason), GRACEFUL_STOP_MS).unref();
      } else {
        ac.abort(reason);
      }
    };
    process.on(sig, h);
    return () => process.off(sig, h);
  };
  const offs = [on('SIGINT', 130), on('SIGTERM', 143)];
  return {
    signal: ac.signal,
    dispose: () => {
      for (const f of offs) f();
    },
    exitCode: () => code,
    graceful: (stop) => {
      graceful = stop;
    },
  };
}

/** Resolves at the first SIGINT or SIGTERM, and stops listening for them. */
export function stopSignal(): Promise<void> {
  return new Promise<void>((resolve) => {
    const stop = (): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}
