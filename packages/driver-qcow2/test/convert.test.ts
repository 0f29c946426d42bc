/**
 * Every kind of image qemu writes, converted to raw by blockconv (library and CLI)
 * and by qemu-img: the outputs must be byte-identical. The CLI's map and info are
 * compared with qemu-img's too.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import {
  KiB,
  MiB,
  TiB,
  cliAsync,
  cliMap,
  create,
  dropBackingFormat,
  libConvert,
  normalizeMap,
  qemuConvert,
  qemuImg,
  qemuIo,
  qemuMap,
  removeDir,
  sameFiles,
  tempDir,
  writeMixed,
} from './helpers.js';

interface Built {
  image: string;
  /** Open options for the library (e.g. a snapshot). */
  open?: Record<string, string>;
  /** Extra qemu-img convert flags meaning the same (e.g. -l). */
  qemuFlags?: string[];
  /** The CLI cannot express the case yet (-l arrives with the CLI's next change). */
  noCli?: boolean;
  noMap?: boolean;
  /** Too large to cmp: compare with qemu-img compare (holes are cheap there). */
  huge?: boolean;
}

interface Case {
  name: string;
  build(dir: string): Built;
}

/** A raw file with data, zero runs and random bytes, for compressed images. */
function rawSource(file: string, size: number): string {
  create(file, size, {}, 'raw');
  const at = (f: number) => Math.floor((size * f) / 4096) * 4096;
  qemuIo(
    file,
    [
      `write -P 0x5a 0 ${at(1 / 6)}`,
      `write -P 0x01 ${at(1 / 3) + 4 * KiB} ${at(1 / 20)}`,
      `write -P 0xc3 ${size - 128 * KiB} ${128 * KiB}`,
    ],
    ['-f', 'raw'],
  );
  // Incompressible bytes too, so that some clusters are stored uncompressed.
  const fd = fs.openSync(file, 'r+');
  const rnd = Buffer.alloc(at(1 / 30));
  let x = 12345;
  for (let i = 0; i < rnd.length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    rnd[i] = x >>> 24;
  }
  fs.writeSync(fd, rnd, 0, rnd.length, at(1 / 2));
  fs.closeSync(fd);
  return file;
}

const cases: Case[] = [
  {
    name: 'cluster size 512 B',
    build: (d) => {
      const f = create(path.join(d, 'c512.qcow2'), 3 * MiB, { cluster_size: 512 });
      writeMixed(f, 512, 3 * MiB);
      return { image: f };
    },
  },
  {
    name: 'cluster size 64 KiB',
    build: (d) => {
      const f = create(path.join(d, 'c64k.qcow2'), 5 * MiB);
      writeMixed(f, 64 * KiB, 5 * MiB);
      return { image: f };
    },
  },
  {
    name: 'cluster size 2 MiB',
    build: (d) => {
      const f = create(path.join(d, 'c2m.qcow2'), 26 * MiB, { cluster_size: 2 * MiB });
      writeMixed(f, 2 * MiB, 26 * MiB);
      return { image: f };
    },
  },
  {
    name: 'compat 0.10 (version 2)',
    build: (d) => {
      const f = create(path.join(d, 'v2.qcow2'), 5 * MiB, { compat: '0.10' });
      writeMixed(f, 64 * KiB, 5 * MiB);
      return { image: f };
    },
  },
  {
    name: 'compat 1.1 with lazy refcounts',
    build: (d) => {
      const f = create(path.join(d, 'v3.qcow2'), 5 * MiB, { compat: '1.1', lazy_refcounts: true });
      writeMixed(f, 64 * KiB, 5 * MiB);
      return { image: f };
    },
  },
  ...[1, 16, 64].map(
    (bits): Case => ({
      name: `refcount_bits ${bits}`,
      build: (d) => {
        const f = create(path.join(d, `rc${bits}.qcow2`), 4 * MiB, { refcount_bits: bits, cluster_size: 4096 });
        writeMixed(f, 4096, 4 * MiB);
        return { image: f };
      },
    }),
  ),
  ...['zlib', 'zstd'].map(
    (type): Case => ({
      name: `compressed clusters (${type})`,
      build: (d) => {
        const src = rawSource(path.join(d, `${type}.src`), 6 * MiB);
        const f = path.join(d, `${type}.qcow2`);
        qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, src, f);
        // Some clusters rewritten uncompressed, one partly, and compressed writes at odd places.
        qemuIo(f, ['write -P 0x77 1M 64k', 'write -P 0x78 100k 4k', 'write -c -P 0x79 4M 64k', 'write -z 2M 64k']);
        return { image: f };
      },
    }),
  ),
  ...[
    { cluster: '512', size: 1536 * KiB },
    { cluster: '2M', size: 6 * MiB },
  ].map(
    ({ cluster, size }): Case => ({
      name: `compressed clusters of ${cluster} bytes`,
      build: (d) => {
        // Small for 512-byte clusters: qemu-img compresses those slowly.
        const src = rawSource(path.join(d, `cs${cluster}.src`), size);
        const f = path.join(d, `cs${cluster}.qcow2`);
        qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cluster}`, src, f);
        return { image: f };
      },
    }),
  ),
  {
    name: 'zero clusters (write -z, plain and preallocated) and discarded ranges',
    build: (d) => {
      const f = create(path.join(d, 'zero.qcow2'), 4 * MiB);
      qemuIo(f, [
        'write -P 1 0 2M',
        'write -z 64k 128k',
        'write -z -u 512k 64k',
        'write -z 3M 64k',
        'discard 1M 256k',
        'write -P 2 1040k 4k',
      ]);
      return { image: f };
    },
  },
  {
    name: 'zero clusters and discards over a backing file',
    build: (d) => {
      const base = create(path.join(d, 'zb-base.qcow2'), 4 * MiB);
      qemuIo(base, ['write -P 9 0 4M']);
      const f = create(path.join(d, 'zb.qcow2'), 4 * MiB, { backing_file: 'zb-base.qcow2', backing_fmt: 'qcow2' });
      qemuIo(f, [
        'write -P 1 0 1M',
        'write -z 64k 64k',
        'write -z -u 256k 64k',
        'write -z 2M 64k',
        'discard 512k 128k',
      ]);
      return { image: f };
    },
  },
  {
    name: 'extended L2 entries with sub-cluster writes over a backing file',
    build: (d) => {
      const base = create(path.join(d, 'el2-base.raw'), 4 * MiB, {}, 'raw');
      qemuIo(base, ['write -P 0xbb 0 4M'], ['-f', 'raw']);
      const f = create(path.join(d, 'el2.qcow2'), 4 * MiB, {
        extended_l2: true,
        cluster_size: 64 * KiB,
        backing_file: 'el2-base.raw',
        backing_fmt: 'raw',
      });
      qemuIo(f, [
        'write -P 1 4k 4k',
        'write -P 2 10k 2k',
        'write -z 16k 2k',
        'write -P 3 64k 64k',
        'write -z 192k 8k',
        'write -z -u 256k 64k',
        'write -P 4 1M 6k',
        'discard 1M 2k',
      ]);
      return { image: f };
    },
  },
  {
    name: 'extended L2 entries, 16 KiB clusters, no backing',
    build: (d) => {
      const f = create(path.join(d, 'el2s.qcow2'), 2 * MiB, { extended_l2: true, cluster_size: 16 * KiB });
      qemuIo(f, ['write -P 1 512 512', 'write -P 2 3k 1k', 'write -z 8k 1k', 'write -P 3 32k 16k', 'write -P 5 1M 5k']);
      return { image: f };
    },
  },
  {
    name: '3-deep backing chain on a raw base (one backing shorter, one format probed)',
    build: (d) => {
      const base = create(path.join(d, 'chain-base.raw'), 3 * MiB, {}, 'raw');
      qemuIo(base, ['write -P 0xa0 0 3M'], ['-f', 'raw']);
      const l1 = create(path.join(d, 'chain-1.qcow2'), 4 * MiB, { backing_file: 'chain-base.raw', backing_fmt: 'raw' });
      qemuIo(l1, ['write -P 0xa1 512k 512k', 'write -z 2M 64k']);
      // No backing format recorded: it is probed.
      const l2 = create(path.join(d, 'chain-2.qcow2'), 5 * MiB, {
        backing_file: 'chain-1.qcow2',
        backing_fmt: 'qcow2',
      });
      qemuIo(l2, ['write -P 0xa2 768k 512k', 'write -P 0xa2 3584k 64k'], ['-f', 'qcow2']);
      dropBackingFormat(l2);
      const top = create(path.join(d, 'chain-3.qcow2'), 6 * MiB, {
        backing_file: 'chain-2.qcow2',
        backing_fmt: 'qcow2',
      });
      qemuIo(top, ['write -P 0xa3 1M 64k', 'discard 0 64k', 'write -P 0xa3 5M 8k']);
      return { image: top };
    },
  },
  {
    name: 'relative backing path into another directory',
    build: (d) => {
      fs.mkdirSync(path.join(d, 'bases'));
      fs.mkdirSync(path.join(d, 'overlays'));
      const base = create(path.join(d, 'bases', 'rel-base.qcow2'), 2 * MiB);
      qemuIo(base, ['write -P 0x31 0 2M']);
      const top = path.join(d, 'overlays', 'rel-top.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', '../bases/rel-base.qcow2', top, '2M');
      qemuIo(top, ['write -P 0x32 64k 64k']);
      return { image: top };
    },
  },
  ...(
    [
      { sel: { snapshot: 'first' }, flags: ['-l', 'first'] },
      { sel: { snapshot: '2' }, flags: ['-l', '2'] },
      { sel: { 'snapshot.name': 'first' }, flags: ['-l', 'snapshot.name=first'] },
      { sel: { 'snapshot.id': '2', 'snapshot.name': 'second' }, flags: ['-l', 'snapshot.id=2,snapshot.name=second'] },
    ] as Array<{ sel: Record<string, string>; flags: string[] }>
  ).map(
    ({ sel, flags }): Case => ({
      name: `internal snapshot read with ${flags.join(' ')}`,
      build: (d) => {
        const f = path.join(d, 'snap.qcow2');
        if (!fs.existsSync(f)) {
          create(f, 2 * MiB, { cluster_size: 4096 });
          qemuIo(f, ['write -P 1 0 1M']);
          qemuImg('snapshot', '-c', 'first', f);
          qemuIo(f, ['write -P 2 512k 1M', 'write -z 0 64k']);
          qemuImg('snapshot', '-c', 'second', f);
          qemuIo(f, ['write -P 3 0 2M']);
          // Grown after the snapshots: their L1 tables (2 MiB per entry) are shorter than the image needs.
          qemuImg('resize', '-q', f, '24M');
          qemuIo(f, ['write -P 4 20M 64k']);
        }
        return { image: f, open: sel, qemuFlags: flags, noCli: true, noMap: true };
      },
    }),
  ),
  {
    name: 'external data file',
    build: (d) => {
      const f = create(path.join(d, 'ext.qcow2'), 4 * MiB, { data_file: path.join(d, 'ext.data') });
      qemuIo(f, ['write -P 1 0 1M', 'write -P 2 2M 4k', 'write -z 64k 64k', 'discard 512k 64k']);
      return { image: f };
    },
  },
  {
    name: 'external data file, data_file_raw',
    build: (d) => {
      const f = create(path.join(d, 'extraw.qcow2'), 4 * MiB, {
        data_file: path.join(d, 'extraw.data'),
        data_file_raw: true,
      });
      qemuIo(f, ['write -P 1 0 1M', 'write -P 2 2M 4k', 'write -z 64k 64k']);
      return { image: f };
    },
  },
  {
    name: 'dirty image (lazy refcounts, writer killed)',
    build: (d) => {
      const f = create(path.join(d, 'dirty.qcow2'), 4 * MiB, { lazy_refcounts: true });
      try {
        qemuIo(f, ['write -P 6 0 1M', 'write -P 7 3M 64k', 'sigraise 9']);
      } catch {
        /* killed, as intended */
      }
      const info = JSON.parse(qemuImg('info', '--output=json', f)) as Record<string, unknown>;
      assert.is(info['dirty-flag'], true, 'the image is dirty');
      return { image: f };
    },
  },
  {
    name: '4 TiB sparse virtual size',
    build: (d) => {
      const f = create(path.join(d, 'huge.qcow2'), 4 * TiB);
      qemuIo(f, ['write -P 1 0 64k', 'write -P 2 1T 128k', 'write -P 3 3T 4k', `write -P 4 ${4 * TiB - 64 * KiB} 64k`]);
      return { image: f, huge: true };
    },
  },
  {
    name: 'virtual size not a multiple of the cluster size',
    build: (d) => {
      const f = create(path.join(d, 'odd.qcow2'), 1000 * KiB + 512);
      qemuIo(f, [`write -P 8 ${960 * KiB} ${40 * KiB + 512}`, 'write -P 9 0 100k']);
      return { image: f };
    },
  },
  {
    name: 'overlay larger than its backing file, odd sizes',
    build: (d) => {
      const base = path.join(d, 'short.raw');
      fs.writeFileSync(base, Buffer.alloc(1000 * KiB + 300, 0x42));
      const f = create(path.join(d, 'long.qcow2'), 3 * MiB, {
        backing_file: 'short.raw',
        backing_fmt: 'raw',
        cluster_size: 4096,
      });
      qemuIo(f, ['write -P 1 996k 8k']);
      return { image: f };
    },
  },
  {
    name: 'metadata preallocation',
    build: (d) => {
      const f = create(path.join(d, 'prealloc.qcow2'), 3 * MiB, { preallocation: 'metadata' });
      qemuIo(f, ['write -P 1 64k 64k']);
      // qemu-img map asks the host file and reports holes of preallocated clusters as zero and data at once.
      return { image: f, noMap: true };
    },
  },
];

const test = suite('convert to raw: identical to qemu-img');
let dir = '';
test.before(() => {
  dir = tempDir();
});
test.after(() => removeDir(dir));

// QCOW2_CASE=regex runs only the matching cases (for debugging).
const only = process.env.QCOW2_CASE ? new RegExp(process.env.QCOW2_CASE) : undefined;
for (const c of cases.filter((x) => !only || only.test(x.name))) {
  test(c.name, async () => {
    const t0 = performance.now();
    const b = c.build(dir);
    const ref = path.join(dir, 'ref.raw');
    const lib = path.join(dir, 'lib.raw');
    const viaCli = path.join(dir, 'cli.raw');
    qemuConvert(b.image, ref, b.qemuFlags);
    // The CLI runs overlap the library conversion: most of their time is node starting.
    const [viaCliRun, ourMap, ourInfo] = await Promise.all([
      b.noCli ? undefined : cliAsync('convert', '-O', 'raw', b.image, viaCli),
      b.noMap ? undefined : cliMap(b.image),
      cliAsync('info', '--output=json', b.image),
      libConvert(b.image, lib, b.open ? { options: b.open } : {}),
    ]);
    // qemu-img compare skips holes: the only way to compare terabytes of them.
    const same = (a: string, x: string): boolean =>
      b.huge ? qemuImg('compare', '-q', '-f', 'raw', '-F', 'raw', a, x) === '' : sameFiles(a, x);
    assert.ok(same(ref, lib), `${c.name}: library output differs from qemu-img's`);
    assert.is(fs.statSync(lib).size, fs.statSync(ref).size);
    if (viaCliRun) {
      assert.is(viaCliRun.status, 0, viaCliRun.stderr);
      assert.ok(same(ref, viaCli), `${c.name}: CLI output differs from qemu-img's`);
    }
    if (ourMap) assert.equal(normalizeMap(ourMap), normalizeMap(qemuMap(b.image)), `${c.name}: map`);
    assert.is(ourInfo.status, 0, ourInfo.stderr);
    assert.equal(JSON.parse(ourInfo.stdout), JSON.parse(qemuImg('info', '--output=json', b.image)), `${c.name}: info`);
    for (const f of [ref, lib, viaCli]) fs.rmSync(f, { force: true });
    if (process.env.QCOW2_TIMING) console.log(`${c.name}: ${(performance.now() - t0).toFixed(0)} ms`);
  });
}

test.run();
