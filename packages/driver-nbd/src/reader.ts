/**
 * Reads a socket's bytes straight into the buffer the protocol wants next (a "sink"):
 * the socket is opened with `onread: { buffer: () => reader.nextBuffer, callback:
 * (n, buf) => reader.onRead(n, buf) }`, so once a header says a large payload follows,
 * the kernel's next reads land in its destination with no copy (as libnbd's recv into
 * the caller's buffer). Headers and small payloads go through one staging buffer, which
 * also batches many small messages into one read.
 */
const STAGING_SIZE = 64 * 1024;
/** Below this many bytes left of a direct sink, reading through staging is as cheap. */
const DIRECT_MIN = 16 * 1024;
const EMPTY = new Uint8Array(0);

export class SinkReader {
  readonly #staging = Buffer.allocUnsafe(STAGING_SIZE);
  #next: Uint8Array = this.#staging;
  #sink: Uint8Array = EMPTY;
  #pos = 0;
  #end = 0;
  #direct = false;
  #stopped = false;

  /**
   * `full` is called each time the sink is full (it then sets the next one with expect());
   * `unasked` gets bytes that arrived while no sink was set (they are the caller's now).
   */
  constructor(
    private readonly full: () => void,
    private readonly unasked: (bytes: Buffer) => void,
  ) {}

  /** Where the socket's next read goes: for the onread buffer function. */
  get nextBuffer(): Uint8Array {
    return this.#next;
  }

  /** The current sink (the buffer last given to expect()). */
  get sink(): Uint8Array {
    return this.#sink;
  }

  /**
   * The next bytes go into sink[start, end); `direct` lets the socket read them there
   * itself (payloads). An empty range counts as full at once.
   */
  expect(sink: Uint8Array, start: number, end: number, direct = false): void {
    this.#sink = sink;
    this.#pos = start;
    this.#end = end;
    this.#direct = direct;
    if (start === end) this.full();
  }

  /** No sink: bytes that arrive go to `unasked`. */
  clear(): void {
    this.#sink = EMPTY;
    this.#pos = this.#end = 0;
    this.#direct = false;
  }

  /** Ignores everything from now on (the connection failed). */
  stop(): void {
    this.#stopped = true;
    this.clear();
    this.#next = this.#staging;
  }

  /** The onread callback: `n` bytes landed in `buf` (staging, or the sink read into directly). */
  onRead(n: number, buf: Uint8Array): void {
    if (this.#stopped) return;
    if (buf !== this.#staging) {
      this.#pos += n;
      if (this.#pos === this.#end) this.full();
    } else {
      this.#consume(this.#staging, n);
    }
    this.#next =
      this.#direct && !this.#stopped && this.#end - this.#pos >= DIRECT_MIN
        ? this.#sink.subarray(this.#pos, this.#end)
        : this.#staging;
  }

  /**
   * For sockets without onread (a server's accepted sockets in Node 20): a 'data' chunk,
   * copied into the sinks as if read into staging.
   */
  feed(chunk: Buffer): void {
    if (!this.#stopped) this.#consume(chunk, chunk.length);
  }

  #consume(src: Buffer, n: number): void {
    let p = 0;
    while (p < n && !this.#stopped) {
      if (this.#pos === this.#end) {
        this.unasked(src.subarray(p, n));
        break;
      }
      const take = Math.min(this.#end - this.#pos, n - p);
      src.copy(this.#sink, this.#pos, p, p + take);
      this.#pos += take;
      p += take;
      if (this.#pos === this.#end) this.full();
    }
  }
}
