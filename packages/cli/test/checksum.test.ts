/**
 * `blockconv checksum` against an independent implementation of blkhash (Python's
 * hashlib, written here from the construction, reading every byte), on images with
 * holes, written zeroes, odd sizes and qcow2 backing chains made by qemu-img/qemu-io.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import * as assert from 'uvu/assert';

const BIN = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'blockconv.js');
const dir = mkdtempSync(join(process.env.BLOCKCONV_TEST_DIR ?? tmpdir(), 'blockconv-checksum-'));
test.after(() => rmSync(dir, { recursive: true, force: true }));

const REFERENCE = `
import hashlib, struct, sys
B = 64 * 1024
outer, n = hashlib.sha256(), 0
with open(sys.argv[1], 'rb') as f:
    while True:
        block = f.read(B)
        if not block:
            break
        outer.update(hashlib.sha256(block).digest())
        n += len(block)
outer.update(struct.pack('<Q', n))
print(outer.hexdigest())
`;

/** blkhash of a raw file, read whole by Python. */
function reference(raw: string): string {
  return execFileSync('python3', ['-c', REFERENCE, raw], { encoding: 'utf8' }).trim();
}

function blockconv(...args: string[]): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function checksumOf(image: string, ...flags: string[]): string {
  const r = blockconv('checksum', ...flags, '--output', 'json', image);
  assert.is(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout) as { checksum: string }).checksum;
}

function qemuIo(image: string, fmt: string, ...cmds: string[]): void {
  execFileSync('qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), image], { stdio: 'ignore' });
}

test('raw images with holes, written zeroes, random data and odd sizes', () => {
  for (const size of [1, 65535, 65536, 3 * 1024 * 1024 + 12345, 64 * 1024 * 1024]) {
    const img = join(dir, `raw-${size}.raw`);
    execFileSync('truncate', ['-s', String(size), img]);
    if (size > 1 << 20) {
      execFileSync('dd', [
        'if=/dev/urandom',
        `of=${img}`,
        'bs=4096',
        'seek=3',
        'count=100',
        'conv=notrunc',
        'status=none',
      ]);
      qemuIo(img, 'raw', 'write -P 0 1M 256k', 'write -P 0x5a 2100k 3k');
      execFileSync('dd', [
        'if=/dev/urandom',
        `of=${img}`,
        'bs=1',
        `seek=${size - 7}`,
        'count=7',
        'conv=notrunc',
        'status=none',
      ]);
    } else if (size > 1) {
      qemuIo(img, 'raw', `write -P 0x11 0 ${Math.floor(size / 2)}`);
    }
    assert.is(checksumOf(img), reference(img), `${size} bytes`);
  }
});

test('text output is blksum\'s "HEX  NAME"; a flipped byte changes it', () => {
  const img = join(dir, 'flip.raw');
  execFileSync('truncate', ['-s', '4M', img]);
  qemuIo(img, 'raw', 'write -P 0x33 1M 1M');
  const r = blockconv('checksum', img);
  assert.is(r.code, 0, r.stderr);
  assert.is(r.stdout, `${reference(img)}  ${img}\n`);
  qemuIo(img, 'raw', 'write -P 0x34 1500k 1');
  assert.is.not(checksumOf(img), r.stdout.split(' ')[0]);
  assert.is(checksumOf(img), reference(img));
});

test('qcow2 with a backing chain, compressed and zero clusters: the guest-visible bytes', () => {
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '10M']);
  qemuIo(base, 'qcow2', 'write -P 0x10 0 4M', 'write -c -P 0x20 6M 1M');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '10M']);
  qemuIo(top, 'qcow2', 'write -P 0x30 1M 64k', 'write -z 2M 1M', 'write -P 0x40 9M 100k');
  const raw = join(dir, 'top.raw');
  execFileSync('qemu-img', ['convert', '-O', 'raw', top, raw]);
  assert.is(checksumOf(top), reference(raw));
  assert.is(checksumOf(raw), reference(raw), 'the same content as raw');
});

test('bad input: a missing image is one line and exit 1', () => {
  const r = blockconv('checksum', join(dir, 'nope.raw'));
  assert.is(r.code, 1);
  assert.match(r.stderr, /^blockconv: .*nope\.raw open: no such file or directory\n$/);
});

test('convert --checksum prints the digest of what it copied; --verify reads the target back (raw and qcow2 targets)', () => {
  const src = join(dir, 'conv-src.raw');
  execFileSync('truncate', ['-s', '20M', src]);
  execFileSync('dd', ['if=/dev/urandom', `of=${src}`, 'bs=64K', 'seek=7', 'count=40', 'conv=notrunc', 'status=none']);
  qemuIo(src, 'raw', 'write -P 0 5M 1M', 'write -P 0x77 19M 4095');
  const want = reference(src);
  for (const [fmt, extra] of [
    ['raw', []],
    ['qcow2', []],
    ['raw', ['-m', '3', '-W']],
    ['qcow2', ['-c']],
  ] as const) {
    const dst = join(dir, `conv-dst.${fmt}`);
    const r = blockconv('convert', '-O', fmt, ...extra, '--checksum', src, dst);
    assert.is(r.code, 0, r.stderr);
    assert.is(r.stdout, `${want}  ${dst}\n`, `${fmt} ${extra.join(' ')}`);
    const v = blockconv('convert', '-O', fmt, ...extra, '--verify', '--output', 'json', src, dst);
    assert.is(v.code, 0, v.stderr);
    const done = JSON.parse(v.stdout.trim().split('\n').at(-1)!) as { checksum: string; verified: boolean };
    assert.is(done.checksum, want);
    assert.ok(done.verified);
    assert.is(checksumOf(dst), want, "the target's own checksum");
  }
});

test.run();
