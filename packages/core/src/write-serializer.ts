/**
 * The barrier behind which a read-modify-write runs alone (see WriteSerializer), used
 * by the request gate (gate.ts) for backends that need alignment.
 */
/**
 * Lets writes run concurrently, except a read-modify-write, which runs alone: it waits
 * for the writes in flight, and writes that arrive meanwhile wait for it (and are then
 * checked again, as the image may have been resized or closed). Otherwise a write
 * landing between the read and the write-back of a block would be undone.
 * Read-modify-writes are rare (the unaligned tail of an image, a format's small
 * metadata update on an O_DIRECT file), so a barrier is cheaper than tracking the range
 * of every write.
 */
export class WriteSerializer {
  #inFlight = 0;
  /** Set while a read-modify-write waits or runs; resolves when the last one queued ends. */
  #exclusive: Promise<void> | null = null;
  #drained: (() => void) | null = null;
  readonly #untrack = (): void => {
    if (--this.#inFlight === 0 && this.#drained) {
      const d = this.#drained;
      this.#drained = null;
      d();
    }
  };

  /** What a new write must wait for first, if anything. */
  get waiting(): Promise<void> | null {
    return this.#exclusive;
  }

  /** Starts a plain write now (the caller has waited for `waiting`), counting it in flight. */
  track<T>(start: () => Promise<T>): Promise<T> {
    this.#inFlight++;
    let p: Promise<T>;
    try {
      p = start();
    } catch (err) {
      this.#untrack();
      return Promise.reject(err);
    }
    p.then(this.#untrack, this.#untrack);
    return p;
  }

  /** Runs `body` once no other write is in flight, holding new writes back until it ends. */
  async exclusive<T>(body: () => Promise<T>): Promise<T> {
    const before = this.#exclusive;
    let release!: () => void;
    const mine = new Promise<void>((r) => {
      release = r;
    });
    const tail = before ? before.then(() => mine) : mine;
    this.#exclusive = tail;
    try {
      if (before) await before;
      if (this.#inFlight > 0)
        await new Promise<void>((r) => {
          this.#drained = r;
        });
      return await body();
    } finally {
      if (this.#exclusive === tail) this.#exclusive = null;
      release();
    }
  }
}
