/**
 * The snapshot table as `check` reads it (QEMU's qcow2_check_read_snapshot_table):
 * an image opened for a check has not read it, so that a broken table can be
 * reported rather than refuse the image. Entries are read as QEMU reads them, past
 * the end of the file as zeroes; what QEMU cannot read makes the check fail.
 */
import { hex } from './errors.js';
import { MAX_SNAPSHOTS } from './header.js';
import { checkFailed, noCounts, type CheckSnapshot, type CheckState, type Counts } from './check-state.js';
import { readPadded } from './check-tables.js';
import { TWO_32 } from './format.js';

const HEADER_BYTES = 40;
/** QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA and QCOW_MAX_SNAPSHOTS_SIZE. */
const MAX_EXTRA_DATA = 1024;
const MAX_TABLE_BYTES = 1024 * MAX_SNAPSHOTS;
/** Version 3 entries hold at least vm_state_size_large and disk_size. */
const V3_MIN_EXTRA_DATA = 16;
const WINDOW = 64 * 1024;

export interface CheckedSnapshots {
  readonly snapshots: CheckSnapshot[];
  /** Bytes of the table (QEMU's snapshots_size): the reference the refcount check counts. */
  readonly size: number;
  /** Corruptions in the table itself (QEMU keeps these apart from the refcount check's). */
  readonly counts: Counts;
}

export async function readSnapshotsForCheck(st: CheckState): Promise<CheckedSnapshots> {
  const { h } = st;
  const counts = noCounts();
  const offset = h.snapshotsOffset;
  // The header parse refuses the cases QEMU's table validation refuses (too many, unaligned).
  if (h.nbSnapshots === 0) return { snapshots: [], size: 0, counts };
  const bytes = new WindowReader(st, offset);
  const snapshots: CheckSnapshot[] = [];
  let at = 0;
  for (let i = 0; i < h.nbSnapshots; i++) {
    st.signal?.throwIfAborted();
    at = Math.ceil(at / 8) * 8;
    const head = await bytes.view(at, HEADER_BYTES);
    const idSize = head.getUint16(12);
    const nameSize = head.getUint16(14);
    const extraDataSize = head.getUint32(36);
    if (extraDataSize > MAX_EXTRA_DATA) {
      // QEMU drops the excess only with -r all, and then rewrites the table: not done here.
      st.messages.push(`ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry ${i}`);
      throw checkFailed(
        st,
        'snapshot table',
        `snapshot table entry ${i} at ${hex(offset + at)} has ${extraDataSize} bytes of extra data (at most ${MAX_EXTRA_DATA})`,
        'ECORRUPT',
      );
    }
    const idAt = at + HEADER_BYTES + extraDataSize;
    const id = await bytes.text(idAt, idSize);
    const name = await bytes.text(idAt + idSize, nameSize);
    at = idAt + idSize + nameSize;
    if (at > MAX_TABLE_BYTES) {
      st.messages.push('ERROR failed to read the snapshot table: Snapshot table is too big');
      throw checkFailed(
        st,
        'snapshot table',
        `the snapshot table at ${hex(offset)} is larger than ${MAX_TABLE_BYTES} bytes (at entry ${i})`,
        'ECORRUPT',
      );
    }
    snapshots.push({
      id,
      name,
      l1TableOffset: head.getUint32(0) * TWO_32 + head.getUint32(4),
      l1Size: head.getUint32(8),
      extraDataSize,
    });
  }
  if (h.version === 3) {
    snapshots.forEach((s, i) => {
      if (s.extraDataSize >= V3_MIN_EXTRA_DATA) return;
      counts.corruptions++;
      // QEMU repairs these (-r all) by rewriting the table, which this check does not do.
      st.messages.push(`ERROR snapshot table entry ${i} is incomplete`);
    });
  }
  return { snapshots, size: at, counts };
}

/** Reads the table in windows, past the end of the file as zeroes. */
class WindowReader {
  #start = 0;
  #bytes: Uint8Array = new Uint8Array(0);
  readonly #decoder = new TextDecoder('utf-8');

  constructor(
    private readonly st: CheckState,
    private readonly base: number,
  ) {}

  async view(at: number, length: number): Promise<DataView> {
    const b = await this.#slice(at, length);
    return new DataView(b.buffer, b.byteOffset, b.byteLength);
  }

  async text(at: number, length: number): Promise<string> {
    return this.#decoder.decode(await this.#slice(at, length));
  }

  async #slice(at: number, length: number): Promise<Uint8Array> {
    if (at < this.#start || at + length > this.#start + this.#bytes.length) {
      this.#start = at;
      this.#bytes = await readPadded(this.st.file, this.st.read, this.base + at, Math.max(length, WINDOW)).catch(
        (err: unknown) => {
          throw checkFailed(
            this.st,
            'snapshot table',
            `cannot read the snapshot table at ${hex(this.base + at)}: ${(err as Error).message}`,
          );
        },
      );
    }
    return this.#bytes.subarray(at - this.#start, at - this.#start + length);
  }
}
