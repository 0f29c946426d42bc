/**
 * A bounded LRU cache of metadata clusters (L2 tables; refcount blocks for a writer),
 * keyed by their offset in the file. Bounded in bytes, never in entries, so that the
 * memory it may take is known whatever the cluster size. Concurrent misses for the
 * same cluster share one read. Tables are kept as their raw on-disk bytes so that a
 * writer can update entries in place and write the same bytes back.
 */

export interface CachedTable {
  /** The table's bytes as stored (big-endian entries). */
  readonly bytes: Uint8Array;
  readonly view: DataView;
}

/** A table's bytes as they were when a commit took them, to be written at `offset`. */
export interface TableCopy {
  readonly offset: number;
  readonly bytes: Uint8Array;
}

export class TableCache {
  /** Insertion order is recency order: the first key is the least recently used. */
  readonly #tables = new Map<number, CachedTable>();
  readonly #loading = new Map<number, Promise<CachedTable>>();
  /** Tables changed in memory and not yet taken for writing: never evicted. */
  readonly #dirty = new Set<number>();
  /**
   * Tables whose copies a commit is writing (a count per table): not evicted either,
   * or a reader would load the old bytes from the file before the new ones land.
   */
  readonly #writing = new Map<number, number>();
  readonly #capacity: number;
  readonly #load: (offset: number) => Promise<Uint8Array>;
  /** The most recently used key, so that repeated hits on it skip the reordering. */
  #lastKey = -1;
  #hits = 0;
  #misses = 0;

  /**
   * @param maxBytes  memory bound; at least two tables are always kept.
   * @param tableBytes size of one table (a cluster).
   * @param load      reads the table at a file offset (already validated by the caller).
   */
  constructor(maxBytes: number, tableBytes: number, load: (offset: number) => Promise<Uint8Array>) {
    this.#capacity = Math.max(2, Math.floor(maxBytes / tableBytes));
    this.#load = load;
  }

  /** Tables the cache may hold at once. */
  get capacity(): number {
    return this.#capacity;
  }
  get size(): number {
    return this.#tables.size;
  }
  get stats(): { hits: number; misses: number } {
    return { hits: this.#hits, misses: this.#misses };
  }
  get dirtyCount(): number {
    return this.#dirty.size;
  }

  /** Adds a table just allocated (not read from the file), dirty. */
  add(offset: number, bytes: Uint8Array): CachedTable {
    const table: CachedTable = { bytes, view: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength) };
    this.#dirty.add(offset);
    this.#insert(offset, table);
    return table;
  }

  /** Records that the cached table at `offset` was changed in memory. */
  markDirty(offset: number): void {
    if (this.#tables.has(offset)) this.#dirty.add(offset);
  }

  /**
   * Copies of every dirty table, which become clean: a commit writes the copies while
   * writers go on changing the tables (changes after this call make them dirty again).
   */
  takeDirty(): TableCopy[] {
    const out: TableCopy[] = [];
    for (const offset of this.#dirty) {
      out.push({ offset, bytes: this.#tables.get(offset)!.bytes.slice() });
      this.#writing.set(offset, (this.#writing.get(offset) ?? 0) + 1);
    }
    this.#dirty.clear();
    return out;
  }

  /** The copies taken by takeDirty() are on disk (or, with `failed`, are not: dirty again). */
  written(copies: readonly TableCopy[], failed = false): void {
    for (const c of copies) {
      const n = (this.#writing.get(c.offset) ?? 1) - 1;
      if (n > 0) this.#writing.set(c.offset, n);
      else this.#writing.delete(c.offset);
      if (failed) this.markDirty(c.offset);
    }
  }

  /** The cached table, marking it most recently used; undefined on a miss (no I/O). */
  peek(offset: number): CachedTable | undefined {
    const t = this.#tables.get(offset);
    if (t) {
      this.#hits++;
      // Only reorder when it is not already the newest: the common sequential case stays a lookup.
      if (this.#lastKey !== offset) {
        this.#tables.delete(offset);
        this.#tables.set(offset, t);
        this.#lastKey = offset;
      }
    }
    return t;
  }

  /** The table at `offset`, read once however many callers ask at the same time. */
  get(offset: number): CachedTable | Promise<CachedTable> {
    return this.peek(offset) ?? this.#fetch(offset);
  }

  #fetch(offset: number): Promise<CachedTable> {
    let p = this.#loading.get(offset);
    if (p) return p;
    this.#misses++;
    p = this.#load(offset)
      .then((bytes) => {
        const table: CachedTable = { bytes, view: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength) };
        this.#insert(offset, table);
        return table;
      })
      .finally(() => this.#loading.delete(offset));
    this.#loading.set(offset, p);
    return p;
  }

  #insert(offset: number, table: CachedTable): void {
    this.#tables.delete(offset);
    if (this.#tables.size >= this.#capacity) {
      // Least recently used first; dirty tables stay until a commit has written them.
      for (const key of this.#tables.keys()) {
        if (this.#tables.size < this.#capacity) break;
        if (!this.#dirty.has(key) && !this.#writing.has(key)) this.#tables.delete(key);
      }
    }
    this.#tables.set(offset, table);
    this.#lastKey = offset;
  }

  /** Drops every table (e.g. when switching to a snapshot's L1 table). */
  clear(): void {
    this.#tables.clear();
    this.#dirty.clear();
    this.#lastKey = -1;
  }
}
