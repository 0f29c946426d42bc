/**
 * Issue 12 part 2: no credential ever leaves the process. Every command and output mode
 * runs with locations that hold a marker password (URL user parts, secret parameters,
 * plain and percent-encoded), and the marker is looked for in everything printed:
 * - in this process through main() with its output filter off, so that each command is
 *   seen to redact by itself (each run has a marker of its own: the redactor remembers
 *   the secrets it has seen in a process, and must not get them from an earlier run);
 * - through the real binary, as users run it.
 * Nothing listens on 127.0.0.1:1, so the iscsi:// and nfs:// runs are failing
 * connections (a real LUN with a password in its URL: driver-iscsi's CLI suite); the
 * file:// runs succeed, the file driver ignoring the query.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { main } from '../src/main.js';

const BIN = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'blockconv.js');
const dir = mkdtempSync(join(process.env.BLOCKCONV_TEST_DIR ?? tmpdir(), 'blockconv-redact-'));
const p = (name: string): string => join(dir, name);
const MiB = 1024 * 1024;

const raw = p('base.raw');
writeFileSync(raw, Buffer.alloc(MiB, 7));
execFileSync('truncate', ['-s', String(4 * MiB), raw]);
const top = p('top.qcow2');
execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', raw, '-F', 'raw', top]);
const big = p('big.raw');
execFileSync('truncate', ['-s', String(8 * MiB), big]);

test.after(() => rmSync(dir, { recursive: true, force: true }));

interface Output {
  code: number;
  stdout: string;
  stderr: string;
}

/** The locations of one run, each holding `m`. */
function locations(m: string) {
  /** A qcow2 image whose stored backing file name is `backing` (qemu-img -u: not opened). */
  const withBacking = (name: string, backing: string): string => {
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', backing, '-F', 'raw', p(name), '4M']);
    return p(name);
  };
  return {
    marker: m,
    iscsi: `iscsi://bob%${m}@127.0.0.1:1/iqn.2026-11.test:none/1`,
    /** libiscsi's mutual-CHAP option; this driver refuses queries and quotes the URL. */
    iscsiParam: `iscsi://127.0.0.1:1/iqn.2026-11.test:none/1?target_password=${m}`,
    nfsUser: `nfs://bob:${m}@127.0.0.1:1/export/x.raw`,
    nfsParam: `nfs://127.0.0.1:1/export/x.raw?version=3&token=${m}`,
    file: `file://${raw}?password=${m}`,
    qcow2: `file://${top}?secret=${m}`,
    fileUser: `file://bob:${m}@localhost${raw}`,
    target: (name: string) => `file://${p(name)}?token=${m}`,
    /** A qcow2 whose backing file is a URL with the marker: opens (the query is ignored)... */
    backedByFile: withBacking(`file-${m}.qcow2`, `file://${raw}?password=${m}`),
    /** ... or fails to (nothing listens), quoting the name. */
    backedByIscsi: withBacking(`iscsi-${m}.qcow2`, `iscsi://bob%${m}@127.0.0.1:1/iqn.2026-11.test:none/1`),
    encodedBacking: `iscsi%3A%2F%2Fbob%25${m}%40127.0.0.1%3A1%2Fiqn.x%2F1`,
  };
}

interface Case {
  readonly args: (l: ReturnType<typeof locations>) => string[];
  readonly code: number;
  /** What the output must show: the command did print the (redacted) location. */
  readonly shows?: RegExp;
}

const CASES: readonly Case[] = [
  // info: human, JSON, the backing chain, backing names stored in an image; failures.
  { args: (l) => ['info', l.file], code: 0, shows: /image: file:\/\/.*\?password=\*\*\*/ },
  { args: (l) => ['info', '--output=json', l.file], code: 0, shows: /"filename": "file:\/\/.*\?password=\*\*\*"/ },
  { args: (l) => ['info', '--backing-chain', '--output=json', l.qcow2], code: 0, shows: /secret=\*\*\*/ },
  {
    args: (l) => ['info', '--output=json', l.backedByFile],
    code: 0,
    shows: /"backing-filename": "file:\/\/.*\?password=\*\*\*"/,
  },
  { args: (l) => ['info', l.backedByFile], code: 0, shows: /backing-filename: file:\/\/.*\?password=\*\*\*/ },
  {
    args: (l) => ['info', l.backedByIscsi],
    code: 1,
    shows: /backing file "iscsi:\/\/bob@127\.0\.0\.1:1.*refused by references=same-server/,
  },
  // Followed (references=any), it fails to connect: the cause chain (--debug) is redacted too.
  { args: (l) => ['--debug', 'info', '--opts', 'references=any', l.backedByIscsi], code: 1, shows: /caused by/ },
  { args: (l) => ['info', l.iscsi], code: 1, shows: /iscsi:\/\/bob@127\.0\.0\.1:1.*connection refused/ },
  { args: (l) => ['--debug', 'info', l.iscsi], code: 1, shows: /\n\s+at / },
  { args: (l) => ['info', '--output=json', l.iscsiParam], code: 1, shows: /target_password=\*\*\*/ },
  { args: (l) => ['info', l.nfsUser], code: 1, shows: /nfs:\/\/bob@127\.0\.0\.1:1/ },
  { args: (l) => ['--debug', 'info', l.nfsParam], code: 1, shows: /token=\*\*\*/ },
  { args: (l) => ['--debug', 'info', l.fileUser], code: 1, shows: /malformed file URL/ },
  // map: the File column, JSON, failures.
  { args: (l) => ['map', l.file], code: 0, shows: /0x0 .*file:\/\/.*\?password=\*\*\*/ },
  { args: (l) => ['map', '--output=json', l.qcow2], code: 0, shows: /"data": true/ },
  { args: (l) => ['map', l.iscsi], code: 1 },
  { args: (l) => ['--debug', 'map', '--output=json', l.nfsUser], code: 1 },
  { args: (l) => ['map', '--start-offset', l.iscsi, l.file], code: 1, shows: /invalid start offset/ },
  // compare: identical, JSON, errors (exit 2).
  { args: (l) => ['compare', l.file, l.qcow2], code: 0, shows: /identical/ },
  { args: (l) => ['compare', '--output=json', l.file, raw], code: 0, shows: /"identical":true/ },
  { args: (l) => ['compare', l.iscsi, raw], code: 2, shows: /iscsi:\/\/bob@/ },
  { args: (l) => ['--debug', 'compare', raw, l.nfsParam], code: 2, shows: /token=\*\*\*/ },
  // check: human, JSON, failures.
  { args: (l) => ['check', l.qcow2], code: 0, shows: /No errors were found/ },
  { args: (l) => ['check', '--output=json', l.qcow2], code: 0, shows: /"filename": "file:\/\/.*secret=\*\*\*"/ },
  { args: (l) => ['check', l.iscsi], code: 1 },
  { args: (l) => ['--debug', 'check', '-f', 'qcow2', l.nfsUser], code: 1 },
  // convert: progress bar lines, JSON progress and result, failures on either side.
  { args: (l) => ['convert', '-p', l.file, l.target('c1.raw')], code: 0, shows: /converted 4 MiB/ },
  {
    args: (l) => ['convert', '--progress=json', '--output=json', l.qcow2, l.target('c2.raw')],
    code: 0,
    shows: /"target":"file:\/\/.*token=\*\*\*"/,
  },
  { args: (l) => ['convert', '-O', 'qcow2', '-B', l.file, l.file, l.target('c3.qcow2')], code: 0 },
  { args: (l) => ['convert', '-p', l.iscsi, p('c4.raw')], code: 1, shows: /iscsi:\/\/bob@/ },
  { args: (l) => ['--debug', 'convert', '-n', '--progress=json', raw, l.iscsi], code: 1, shows: /\n\s+at / },
  { args: (l) => ['convert', '-n', '--output=json', big, l.target('base.raw')], code: 1, shows: /target is smaller/ },
  { args: (l) => ['convert', '-O', 'qcow2', '-B', l.encodedBacking, raw, p('c5.qcow2')], code: 1 },
  { args: (l) => ['--debug', 'convert', l.nfsUser, p('c6.raw')], code: 1 },
  // create: the "Formatting" line (location, -o values, backing), failures.
  { args: (l) => ['create', l.target('n1.raw'), '1M'], code: 0, shows: /Formatting 'file:\/\/.*token=\*\*\*'/ },
  {
    args: (l) => ['create', '-f', 'qcow2', '-b', l.iscsi, '-F', 'raw', p('n2.qcow2'), '1M'],
    code: 1,
    shows: /backing_file=iscsi:\/\/bob@/,
  },
  {
    args: (l) => ['create', '-f', 'qcow2', '-o', `secret=${l.marker}`, l.target('n3.qcow2'), '1M'],
    code: 1,
    shows: /secret=\*\*\*/,
  },
  { args: (l) => ['--debug', 'create', '-f', 'qcow2', l.iscsiParam, '1M'], code: 1 },
  // drivers: no location in it, but it runs with the rest.
  { args: () => ['drivers'], code: 0, shows: /protocol iscsi/ },
  { args: () => ['drivers', '--output=json'], code: 0 },
];

/** Runs main() here, with the output filter off, and collects what it writes. */
async function inProcess(args: string[]): Promise<Output> {
  const out = { stdout: '', stderr: '' };
  const streams = { stdout: process.stdout, stderr: process.stderr } as const;
  const writes = { stdout: process.stdout.write, stderr: process.stderr.write };
  for (const k of ['stdout', 'stderr'] as const) {
    streams[k].write = ((chunk: unknown) => {
      out[k] += String(chunk);
      return true;
    }) as typeof process.stdout.write;
  }
  try {
    const code = await main(['node', 'blockconv', ...args], { redactOutput: false });
    return { code, ...out };
  } finally {
    for (const k of ['stdout', 'stderr'] as const) streams[k].write = writes[k];
  }
}

function spawned(args: string[]): Output {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function check(r: Output, marker: string, c: Case, args: string[], how: string): void {
  const all = r.stdout + r.stderr;
  const what = `${how} ${args.join(' ')}:\n${all}`;
  assert.not.ok(all.includes(marker), `marker printed by ${what}`);
  assert.is(r.code, c.code, `exit code of ${what}`);
  if (c.shows) assert.match(all, c.shows, what);
}

test('each command redacts by itself: main() with the output filter off', async () => {
  let n = 0;
  for (const c of CASES) {
    const marker = `MARKERpw${++n}z`;
    const args = c.args(locations(marker));
    check(await inProcess(args), marker, c, args, 'in process');
  }
});

test('the blockconv binary prints no marker in any command or output mode', () => {
  let n = 0;
  for (const c of CASES) {
    const marker = `MARKERbin${++n}z`;
    const args = c.args(locations(marker));
    check(spawned(args), marker, c, args, 'spawned');
  }
});

test('the output filter masks what a command would have printed past the redactor', async () => {
  const { redactStreams } = await import('../src/redact-output.js');
  let seen = '';
  const stream = {
    write: (s: string) => {
      seen += s;
      return true;
    },
  } as unknown as NodeJS.WriteStream;
  const undo = redactStreams([stream]);
  stream.write('open iscsi://bob%MARKERfilter@h/iqn.x/1 failed; nfs://h/e?token=MARKERfilter2\n');
  undo();
  stream.write('after iscsi://bob%MARKERfilter3@h/t/1\n');
  assert.is(seen, 'open iscsi://bob@h/iqn.x/1 failed; nfs://h/e?token=***\nafter iscsi://bob%MARKERfilter3@h/t/1\n');
});

test.run();
