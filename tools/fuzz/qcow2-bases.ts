/**
 * The valid images the qcow2 fuzzer starts from, made by qemu-img and qemu-io at run
 * time: both versions, cluster sizes from 512 B to 2 MiB, every refcount width,
 * zlib and zstd compression, extended L2, snapshots, a backing file, external data
 * files, persistent bitmaps, lazy refcounts with the dirty bit, metadata
 * preallocation. Small virtual sizes keep a case cheap; each image holds data, zero
 * clusters and holes, so that every kind of L2 entry is there to mutate.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

export interface Base {
  readonly name: string;
  /** The image; the files it refers to (backing, data file) sit beside it, named relatively. */
  readonly file: string;
}

const MiB = 1024 * 1024;

// Run in the images' directory: qemu-img resolves a relative data file name against
// its working directory (blockconv, like QEMU for backing files, against the image's).
let cwd = '.';

function qemuImg(...args: string[]): void {
  execFileSync('qemu-img', args, { stdio: ['ignore', 'ignore', 'pipe'], cwd });
}

function qemuIo(image: string, cmds: string[], extra: string[] = []): void {
  execFileSync('qemu-io', [...extra, ...cmds.flatMap((c) => ['-c', c]), image], {
    stdio: ['ignore', 'ignore', 'pipe'],
    cwd,
  });
}

function create(file: string, size: number, opts: Record<string, string | number> = {}, extra: string[] = []): string {
  const o = Object.entries(opts)
    .map(([k, v]) => `${k}=${v}`)
    .join(',');
  qemuImg('create', '-q', '-f', 'qcow2', ...(o ? ['-o', o] : []), ...extra, file, String(size));
  return file;
}

/** Data, a zero write, a discard and a sub-cluster write, placed by cluster size. */
function fill(image: string, cluster: number, size: number, extra: string[] = []): void {
  const c = Math.min(cluster, size / 16);
  qemuIo(image, [
    `write -P 0x11 0 ${2 * c}`,
    `write -z ${3 * c} ${c}`,
    `write -P 0x22 ${5 * c + 512} 1024`,
    `write -P 0x33 ${size / 2} ${c}`,
    `write -P 0x44 ${size - c} ${c}`,
    `discard ${c} ${c}`,
    ...extra,
  ]);
}

export function makeBases(dir: string): Base[] {
  fs.mkdirSync(dir, { recursive: true });
  cwd = dir;
  const at = (n: string): string => path.join(dir, n);
  const bases: Base[] = [];
  const add = (name: string, file: string): void => {
    bases.push({ name, file });
  };

  add(
    'v2 64k',
    (() => {
      const f = create(at('v2.qcow2'), 2 * MiB, { compat: '0.10' });
      fill(f, 65536, 2 * MiB);
      return f;
    })(),
  );
  for (const c of [512, 4096, 65536, 2 * MiB]) {
    const size = c === 2 * MiB ? 32 * MiB : 2 * MiB;
    const f = create(at(`v3-c${c}.qcow2`), size, { cluster_size: c });
    fill(f, c, size);
    add(`v3 ${c}-byte clusters`, f);
  }
  for (const bits of [1, 2, 4, 8, 32, 64]) {
    const f = create(at(`rc${bits}.qcow2`), 2 * MiB, { refcount_bits: bits, cluster_size: 4096 });
    fill(f, 4096, 2 * MiB);
    add(`refcount_bits=${bits}`, f);
  }
  for (const type of ['zlib', 'zstd']) {
    const raw = at(`${type}-src.raw`);
    qemuImg('create', '-q', '-f', 'raw', raw, String(2 * MiB));
    qemuIo(raw, ['write -P 0x55 0 256k', 'write -P 0x66 1M 64k', 'write -P 0x77 1600k 3k'], ['-f', 'raw']);
    const f = at(`${type}.qcow2`);
    qemuImg(
      'convert',
      '-q',
      '-c',
      '-f',
      'raw',
      '-O',
      'qcow2',
      '-o',
      `compression_type=${type},cluster_size=16384`,
      raw,
      f,
    );
    fs.rmSync(raw);
    add(`compressed ${type}`, f);
  }
  for (const c of [16384, 65536]) {
    const f = create(at(`el2-c${c}.qcow2`), 2 * MiB, { extended_l2: 'on', cluster_size: c });
    fill(f, c, 2 * MiB, [`write -P 0x88 ${c + 2048} 2048`, `write -z ${4 * c + 1024} 1024`]);
    add(`extended L2 ${c}`, f);
  }
  {
    const f = create(at('snap.qcow2'), 2 * MiB);
    fill(f, 65536, 2 * MiB);
    qemuImg('snapshot', '-c', 'one', f);
    qemuIo(f, ['write -P 0x99 0 64k', 'write -P 0x9a 1M 128k']);
    qemuImg('snapshot', '-c', 'two', f);
    qemuIo(f, ['write -P 0x9b 64k 64k']);
    add('two snapshots', f);
  }
  {
    const back = create(at('backing.qcow2'), 2 * MiB, { cluster_size: 4096 });
    fill(back, 4096, 2 * MiB);
    const f = create(at('overlay.qcow2'), 2 * MiB, {}, ['-b', 'backing.qcow2', '-F', 'qcow2']);
    qemuIo(f, ['write -P 0xaa 4k 8k', 'write -z 1M 64k', 'write -P 0xab 1900k 4k']);
    add('overlay on a qcow2 backing file', f);
    const rawBack = at('backing.raw');
    qemuImg('create', '-q', '-f', 'raw', rawBack, String(MiB));
    qemuIo(rawBack, ['write -P 0xac 0 64k'], ['-f', 'raw']);
    const g = create(at('overlay-raw.qcow2'), 2 * MiB, {}, ['-b', 'backing.raw', '-F', 'raw']);
    qemuIo(g, ['write -P 0xad 32k 64k']);
    add('overlay on a shorter raw backing file', g);
  }
  for (const raw of ['off', 'on']) {
    const f = create(at(`extdata-${raw}.qcow2`), 2 * MiB, { data_file: `extdata-${raw}.data`, data_file_raw: raw });
    fill(f, 65536, 2 * MiB);
    add(`external data file, data_file_raw=${raw}`, f);
  }
  {
    const f = create(at('bitmaps.qcow2'), 4 * MiB, { cluster_size: 65536 });
    qemuImg('bitmap', '--add', f, 'b0');
    qemuImg('bitmap', '--add', '-g', '512k', f, 'b1');
    fill(f, 65536, 4 * MiB);
    qemuImg('bitmap', '--add', '--disable', f, 'b2');
    add('persistent bitmaps', f);
  }
  {
    const f = create(at('lazy.qcow2'), 2 * MiB, { lazy_refcounts: 'on', cluster_size: 4096 });
    // Writing with lazy refcounts and stopping without a flush leaves the dirty bit set.
    try {
      qemuIo(f, ['write -P 0xbb 0 64k', 'write -P 0xbc 1M 4k', 'abort']);
    } catch {
      /* qemu-io's abort is SIGABRT */
    }
    add('lazy refcounts, dirty', f);
  }
  {
    const f = create(at('prealloc.qcow2'), 2 * MiB, { preallocation: 'metadata', cluster_size: 4096 });
    qemuIo(f, ['write -P 0xcd 8k 4k', 'write -z 64k 64k']);
    add('preallocation=metadata', f);
  }
  return bases;
}
