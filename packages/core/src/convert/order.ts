/**
 * The write-order gate of in-order converts: chunk N issues its writes once chunk N-1
 * has issued (or, to a one-at-a-time target, finished) its own. Issue order, not
 * completion order: several chunks' writes stay in flight.
 */

/** Lets chunk N issue its writes only after chunk N-1 issued (or, serialized, finished) its own. */
export class WriteOrder {
  #next = 0;
  readonly #waiters = new Map<number, () => void>();

  turn(seq: number): Promise<void> | undefined {
    if (seq === this.#next) return undefined;
    return new Promise((resolve) => this.#waiters.set(seq, resolve));
  }

  done(seq: number): void {
    this.#next = seq + 1;
    const w = this.#waiters.get(this.#next);
    if (w) {
      this.#waiters.delete(this.#next);
      w();
    }
  }

  /** Wakes everyone (on failure), so that workers can see the error and exit. */
  releaseAll(): void {
    for (const w of this.#waiters.values()) w();
    this.#waiters.clear();
  }
}
