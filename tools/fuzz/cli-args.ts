/**
 * Command-line fuzzing (issue 15): random and malformed command lines for the real
 * `blockconv` command — every command and its options, values that are garbage, huge,
 * negative or empty, URLs with odd escapes, odd environment variables — each run in a
 * scratch directory. Every run must end (20 s; the servers `worker` and `dashboard` are
 * stopped and not counted) with a documented exit code and, when it fails, one error
 * line ("blockconv: ..." or commander's "error: ...", with at most its "Did you mean"
 * hint): never a stack trace, never Node's own crash output.
 *
 *   tsx tools/fuzz/cli-args.ts [--cases N] [--seed S] [--jobs J]
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { caseSeed, prng, type Rand } from './qcow2-mutate.js';

const CLI = fileURLToPath(new URL('../../packages/cli/bin/blockconv.js', import.meta.url));

const COMMANDS: Record<string, string[]> = {
  convert: [
    '-f',
    '-O',
    '-m',
    '-W',
    '-S',
    '-n',
    '--target-is-zero',
    '-c',
    '-B',
    '-F',
    '-t',
    '-T',
    '-r',
    '-o',
    '--source-opts',
    '--target-opts',
    '--tee',
    '--checksum',
    '--verify',
    '--resume',
    '--state',
    '--checkpoint',
    '-p',
    '--progress',
    '--output',
    '-q',
    '--buffer-size',
    '-l',
  ],
  create: ['-f', '-o', '-b', '-F', '-u', '-q'],
  check: ['-f', '-r', '--output', '-q', '--opts'],
  info: ['-f', '--backing-chain', '--output', '--opts'],
  compare: ['-f', '-F', '-s', '-m', '--output', '-q', '--opts', '--opts2'],
  map: ['-f', '--output', '--start-offset', '--max-length', '--opts'],
  checksum: ['-f', '--opts', '-p', '--progress', '--output'],
  drivers: ['--output'],
  jobs: ['--redis', '--queue', '--output', '--state'],
  submit: [
    '--redis',
    '--queue',
    '--batch',
    '--tee',
    '--cap',
    '--wait',
    '--source-opts',
    '--target-opts',
    '-o',
    '-r',
    '-O',
  ],
  frobnicate: [],
};

const WORDS = [
  '',
  '-',
  '--',
  '0',
  '-1',
  '1',
  '7',
  '64',
  '257',
  '99999999999999999999999',
  '1e309',
  'NaN',
  'Infinity',
  '0x10',
  '1.5',
  '4k',
  '1M',
  '8E',
  '9Z',
  '-5G',
  'raw',
  'qcow2',
  'vmdk',
  'help',
  'none',
  'unsafe',
  'json',
  'human',
  'leaks',
  'all',
  'off',
  '30s',
  '1G,30s',
  'k=v',
  'a=b,,c',
  '=',
  ',,',
  'timeout=x',
  'timeout=99999999999',
  'references=any',
  'l2-cache-size=-1',
  'compression_type=zstd',
  'cluster_size=3',
  'size=1P',
  'backing_file=/etc/passwd',
  'a.raw',
  'b.qcow2',
  'missing.raw',
  '.',
  '..',
  '/',
  '/dev/null',
  '/dev/zero',
  '/proc/self/mem',
  'out.raw',
  'out.qcow2',
  'nfs://',
  'nfs:///export/x',
  'nfs://127.0.0.1:1/export/x',
  'nfs://127.0.0.1/%zz/x',
  'nfs://127.0.0.1/export/x?version=9',
  'nfs://user:pass@127.0.0.1/e/x',
  'nfs://[::1/e/x',
  'nfs://127.0.0.1/export/x?uid=-1',
  'iscsi://',
  'iscsi://127.0.0.1:1/iqn.x:y/0',
  'iscsi://127.0.0.1/iqn/abc',
  'iscsi://u%00:p@127.0.0.1/iqn.a:b/1',
  'iscsi://[::1]:99999/iqn.a:b/1',
  'file:///%2e%2e/etc/passwd',
  'file://host/x',
  'file:///tmp/%',
  'foo://bar',
  'http://127.0.0.1:1/x',
  'nbd://x',
  'redis://127.0.0.1:1',
  'redis://',
  'redis://:pw@127.0.0.1:1/99',
  '\u0000',
  '\u202e',
  'é',
  '😀',
  '%00',
  '\\',
  '"',
  "'",
  '$(id)',
  '`id`',
  ';',
  '|',
];

function pick<T>(rand: Rand, xs: readonly T[]): T {
  return xs[Math.floor(rand() * xs.length)]!;
}

function word(rand: Rand): string {
  const r = rand();
  if (r < 0.75) return pick(rand, WORDS);
  if (r < 0.85) return String(Math.floor((rand() - 0.5) * 2 ** (1 + Math.floor(rand() * 70))));
  if (r < 0.95)
    return Array.from({ length: 1 + Math.floor(rand() * 40) }, () =>
      String.fromCharCode(33 + Math.floor(rand() * 94)),
    ).join('');
  return 'x'.repeat(1 + Math.floor(rand() * 100_000));
}

export interface ArgCase {
  readonly argv: string[];
  readonly env: Record<string, string>;
}

export function makeCase(seed: number, i: number): ArgCase {
  const rand = prng(caseSeed(seed, i));
  const cmd = rand() < 0.05 ? word(rand) : pick(rand, Object.keys(COMMANDS));
  const opts = COMMANDS[cmd] ?? [];
  const argv = [cmd];
  const n = Math.floor(rand() * 6);
  for (let k = 0; k < n; k++) {
    const r = rand();
    if (r < 0.6 && opts.length) {
      argv.push(pick(rand, opts));
      if (rand() < 0.8) argv.push(word(rand));
    } else if (r < 0.7) argv.push(`--${word(rand)}`);
    else argv.push(word(rand));
  }
  if (rand() < 0.1) argv.push(rand() < 0.5 ? '--help' : '--debug');
  // NUL cannot pass through exec: drop it where the OS would refuse the call itself.
  const clean = argv.map((a) => a.replace(/\0/g, ''));
  const env: Record<string, string> = {};
  if (rand() < 0.2)
    env[
      pick(rand, ['XDG_STATE_HOME', 'HOME', 'BLOCKCONV_REDIS', 'NODE_OPTIONS', 'LANG', 'COLUMNS', 'TERM', 'NO_COLOR'])
    ] = pick(rand, ['/nonexistent', '', 'x'.repeat(5000), '--max-old-space-size=16', 'C', '-1', 'dumb']);
  return { argv: clean, env };
}

export interface ArgOutcome {
  readonly index: number;
  readonly argv: readonly string[];
  readonly problem?: string;
  readonly nodeItself?: string;
  readonly code: number | null;
  readonly ms: number;
}

const OK_CODES = new Set([0, 1, 2, 3, 63]);

/** What is wrong with a run, or undefined. */
function judge(
  code: number | null,
  signal: NodeJS.Signals | null,
  stderr: string,
  timedOut: boolean,
  argv: readonly string[],
): string | undefined {
  const server = argv[0] === 'worker' || argv[0] === 'dashboard';
  if (timedOut) return server ? undefined : 'no exit within 20 s';
  if (signal) return `killed by ${signal}`;
  if (!OK_CODES.has(code!)) return `exit ${code}`;
  if (/^\s+at /m.test(stderr) && !argv.includes('--debug')) return 'a stack trace';
  if (/node:internal|Node\.js v\d|TypeError|ReferenceError|RangeError/.test(stderr) && !argv.includes('--debug'))
    return "Node's own error output";
  if (code !== 0 && !argv.includes('--debug')) {
    const lines = stderr
      .split('\n')
      .filter(
        (l) =>
          l &&
          !l.startsWith('blockconv: warning: ') &&
          !l.startsWith('blockconv: note: ') &&
          !/^\(Did you mean .*\?\)$/.test(l),
      );
    if (lines.length === 0 && !/^(compare|check)$/.test(argv[0] ?? '')) return 'a failure with no message';
    if (lines.length > 1) return `${lines.length} error lines`;
    if (lines.length === 1 && !/^(blockconv: |error: )/.test(lines[0]!))
      return `an error line in no known voice: ${lines[0]!.slice(0, 200)}`;
  }
  return undefined;
}

function runOne(c: ArgCase, cwd: string, index: number): Promise<ArgOutcome> {
  return new Promise((resolve) => {
    const started = performance.now();
    const child = spawn(process.execPath, [CLI, ...c.argv], {
      cwd,
      env: { ...process.env, XDG_STATE_HOME: path.join(cwd, 'state'), ...c.env },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => {
      if (stderr.length < 1 << 20) stderr += d;
    });
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, 20_000);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const problem = judge(code, timedOut ? null : signal, stderr, timedOut, c.argv);
      // Some environments stop Node itself before any of our code runs (seen: LANG=/nonexistent
      // segfaults Debian's node 20 in its ICU set-up, `node -e 0` as well): not ours to judge.
      if (problem && (signal || code === 9) && Object.keys(c.env).length) {
        const bare = spawnSync(process.execPath, ['-e', '0'], { env: { ...process.env, ...c.env } });
        if (bare.status === code && bare.signal === signal) {
          resolve({
            index,
            argv: c.argv,
            code,
            ms: performance.now() - started,
            nodeItself: `${JSON.stringify(c.env).slice(0, 80)}: node -e 0 ends the same way (${signal ?? `exit ${code}`})`,
          });
          return;
        }
      }
      resolve({
        index,
        argv: c.argv,
        code,
        ms: performance.now() - started,
        problem: problem && `${problem}: ${stderr.slice(0, 600)}`,
      });
    });
  });
}

export async function runArgFuzz(o: {
  cases: number;
  seed: number;
  jobs?: number;
  log?: (l: string) => void;
}): Promise<{ cases: number; problems: ArgOutcome[]; nodeItself: string[]; byCode: Record<string, number> }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockconv-argfuzz-'));
  fs.writeFileSync(path.join(dir, 'a.raw'), Buffer.alloc(1 << 20, 7));
  fs.writeFileSync(path.join(dir, 'b.qcow2'), Buffer.from('QFI\xfb', 'latin1'));
  const problems: ArgOutcome[] = [];
  const nodeItself: string[] = [];
  const byCode: Record<string, number> = {};
  let next = 0;
  const worker = async (): Promise<void> => {
    for (;;) {
      const i = next++;
      if (i >= o.cases) return;
      const cwd = fs.mkdtempSync(path.join(dir, 'c'));
      for (const f of ['a.raw', 'b.qcow2']) fs.copyFileSync(path.join(dir, f), path.join(cwd, f));
      const r = await runOne(makeCase(o.seed, i), cwd, i);
      fs.rmSync(cwd, { recursive: true, force: true });
      byCode[String(r.code)] = (byCode[String(r.code)] ?? 0) + 1;
      if (r.nodeItself) nodeItself.push(`case ${i}: ${r.nodeItself}`);
      if (r.problem) {
        problems.push(r);
        o.log?.(
          `PROBLEM case ${i} (seed ${o.seed}): ${JSON.stringify(r.argv.map((a) => (a.length > 80 ? `${a.slice(0, 20)}...(${a.length})` : a)))}: ${r.problem}`,
        );
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: o.jobs ?? 2 }, worker));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return { cases: o.cases, problems, nodeItself, byCode };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const { values } = parseArgs({
    options: {
      cases: { type: 'string', default: '1000' },
      seed: { type: 'string', default: '1' },
      jobs: { type: 'string', default: '2' },
    },
  });
  const r = await runArgFuzz({
    cases: Number(values.cases),
    seed: Number(values.seed),
    jobs: Number(values.jobs),
    log: (l) => console.error(l),
  });
  console.log(
    `${r.cases} command lines (seed ${values.seed}): ${r.problems.length} problems; exit codes ${JSON.stringify(r.byCode)}; ${r.nodeItself.length} environments Node itself does not start in${r.nodeItself.length ? `:\n${r.nodeItself.join('\n')}` : ''}`,
  );
  process.exitCode = r.problems.length ? 1 : 0;
}
