/**
 * convert --resume against real kills: the CLI is SIGKILLed at a random instant of a
 * 1 GiB convert, then the same command with --resume must finish the copy: qemu-img
 * compare identical, qemu-img check clean for qcow2, the --checksum digest equal to
 * that of the source. For each target kind: file raw and qcow2, NFS raw and qcow2
 * (NFS-Ganesha), an iSCSI LUN (tgtd). Also: what the interrupted run had written past
 * its last checkpoint (copied again) against the bound, a changed source refused,
 * SIGINT, and an NFS server that dies mid-copy.
 *
 * BLOCKCONV_RESUME_KILLS kills per target kind (default 2; tools/resume-campaign.sh
 * runs 20), BLOCKCONV_RESUME_SEED the seed (default 1), BLOCKCONV_RESUME_REPORT a file
 * to append one JSON line per kill to.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BASE_URL, EXPORT_DIR, ensureServer as ensureNfs } from '../../../tools/test/nfs-server.js';
import { LUN_DIR, PORTAL, IQN, ensureServer as ensureIscsi, wipeLun } from '../../../tools/test/iscsi-server.js';

const BIN = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'blockconv.js');
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const KILLS = Number(process.env.BLOCKCONV_RESUME_KILLS ?? 2);
const SEED = Number(process.env.BLOCKCONV_RESUME_SEED ?? 1);
const REPORT = process.env.BLOCKCONV_RESUME_REPORT;
/** Checkpoint interval and copy shape of the kill runs: re-copied bytes must stay within INTERVAL + WORKERS x BUFFER. */
const INTERVAL = 64 * MiB;
const WORKERS = 8;
const BUFFER = 2 * MiB;

const dir = fs.mkdtempSync(join(process.env.BLOCKCONV_TEST_DIR ?? tmpdir(), 'blockconv-resume-'));
const stateDir = join(dir, 'state');
const env = { ...process.env, BLOCKCONV_STATE_DIR: stateDir };
const nfsFiles: string[] = [];
test.after(() => {
  fs.rmSync(dir, { recursive: true, force: true });
  for (const f of nfsFiles) fs.rmSync(f, { force: true });
});

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 0x1_0000_0000;
  };
}
const random = rng(SEED);
let serial = 0;
/** A name no other test process uses. */
const uniq = (prefix: string, ext: string): string => `${prefix}-${process.pid}-${serial++}.${ext}`;

function blockconv(args: string[], timeout = 300_000): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout, env });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/**
 * As blockconv(), without blocking this process (whose event loop may be forwarding for
 * it); SIGKILLed after `killAfterMs` if given.
 */
async function blockconvAsync(
  args: string[],
  killAfterMs?: number,
): Promise<{ code: number | null; killed: boolean; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [BIN, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => {
    stdout += d.toString();
  });
  child.stderr.on('data', (d: Buffer) => {
    stderr += d.toString();
  });
  const timer = killAfterMs === undefined ? undefined : setTimeout(() => child.kill('SIGKILL'), killAfterMs);
  const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  clearTimeout(timer);
  return { code, killed: code === null, stdout, stderr };
}

/** 1 GiB: 448 MiB of data in runs of several patterns and random bytes, written zeroes, holes, an odd tail. */
const SOURCE = join(dir, 'source.raw');
function makeSource(file: string): void {
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', file, String(GiB - 7 * 512)]);
  const cmds = [
    'write -P 0x11 0 96M',
    'write -P 0x22 160M 64M',
    'write -P 0 240M 32M',
    'write -P 0x33 300M 1M',
    'write -P 0x44 302M 1M',
    'write -P 0x55 520M 128M',
    'write -P 0x66 900M 64M',
  ];
  execFileSync('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), file], { stdio: 'ignore' });
  // Random data, so that a misplaced block cannot compare equal by chance.
  execFileSync('dd', [
    'if=/dev/urandom',
    `of=${file}`,
    'bs=1M',
    'seek=700',
    'count=160',
    'conv=notrunc',
    'status=none',
  ]);
  execFileSync('dd', [
    'if=/dev/urandom',
    `of=${file}`,
    'bs=512',
    `seek=${(GiB - 7 * 512) / 512 - 3}`,
    'count=3',
    'conv=notrunc',
    'status=none',
  ]);
}

let sourceDigest = '';
test.before(() => {
  makeSource(SOURCE);
  const r = blockconv(['checksum', '--output', 'json', SOURCE]);
  assert.is(r.code, 0, r.stderr);
  sourceDigest = (JSON.parse(r.stdout) as { checksum: string }).checksum;
});

interface Kind {
  name: string;
  /** Target as blockconv names it, as qemu-img opens it, and its local file (to see what was written). */
  target: () => { url: string; qemu: string[]; local: string };
  format: 'raw' | 'qcow2';
  /** Extra flags (the LUN: -n, it cannot be created). */
  flags: string[];
  reset?: (local: string) => void;
}

const LUN = { url: `iscsi://${PORTAL}/${IQN}:disk512/4`, local: join(LUN_DIR, 'disk512-bench.img') };

const KINDS: Kind[] = [
  {
    name: 'file raw',
    format: 'raw',
    flags: [],
    target: () => {
      const f = join(dir, uniq('t', 'raw'));
      return { url: f, qemu: [f], local: f };
    },
  },
  {
    name: 'file qcow2',
    format: 'qcow2',
    flags: [],
    target: () => {
      const f = join(dir, uniq('t', 'qcow2'));
      return { url: f, qemu: [f], local: f };
    },
  },
  { name: 'NFS raw', format: 'raw', flags: [], target: () => nfsTarget('raw') },
  { name: 'NFS qcow2', format: 'qcow2', flags: [], target: () => nfsTarget('qcow2') },
  {
    name: 'file qcow2 -c',
    format: 'qcow2',
    flags: ['-c'],
    target: () => {
      const f = join(dir, uniq('t', 'qcow2'));
      return { url: f, qemu: [f], local: f };
    },
  },
  { name: 'NFS qcow2 -c', format: 'qcow2', flags: ['-c'], target: () => nfsTarget('qcow2') },
  {
    name: 'iSCSI LUN',
    format: 'raw',
    flags: ['-n'],
    target: () => ({
      url: LUN.url,
      qemu: ['--image-opts', `driver=raw,file.driver=file,file.filename=${LUN.local}`],
      local: LUN.local,
    }),
    reset: (f) => wipeLun(f),
  },
];

function nfsTarget(fmt: string): { url: string; qemu: string[]; local: string } {
  const name = uniq('resume', fmt);
  const local = join(EXPORT_DIR, name);
  nfsFiles.push(local);
  return { url: `${BASE_URL}/${name}`, qemu: [local], local };
}

/** The furthest offset of the target holding anything: how far the killed run got. */
function writtenEnd(local: string, format: string): number {
  if (format === 'qcow2') {
    const map = JSON.parse(
      execFileSync('qemu-img', ['map', '-U', '--output=json', '-f', 'qcow2', local], { encoding: 'utf8' }),
    ) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
    return map.filter((e) => e.data || (!e.zero && e.data)).reduce((m, e) => Math.max(m, e.start + e.length), 0);
  }
  // Raw: the last non-zero 64 KiB block (the target started out all zeroes).
  const fd = fs.openSync(local, 'r');
  const buf = Buffer.alloc(16 * MiB);
  let end = 0;
  try {
    const size = Math.min(fs.fstatSync(fd).size || GiB, GiB);
    for (let pos = 0; pos < size; pos += buf.length) {
      const n = fs.readSync(fd, buf, 0, Math.min(buf.length, size - pos), pos);
      for (let b = Math.ceil(n / 65536) - 1; b >= 0; b--) {
        const block = buf.subarray(b * 65536, Math.min(n, (b + 1) * 65536));
        if (block.some((x) => x !== 0)) {
          end = Math.max(end, pos + b * 65536 + block.length);
          break;
        }
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  return end;
}

function qemuImg(args: string[]): { code: number; out: string; stdout: string } {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  return { code: r.status ?? -1, out: (r.stdout + r.stderr).trim(), stdout: r.stdout };
}

// BLOCKCONV_RESUME_KINDS: only the kinds whose name contains it (e.g. "qcow2").
for (const kind of KINDS.filter((k) => k.name.includes(process.env.BLOCKCONV_RESUME_KINDS ?? ''))) {
  test(`${kind.name}: ${KILLS} SIGKILLs at random instants of a 1 GiB convert, each resumed to an identical, verified copy`, async () => {
    if (kind.name.startsWith('NFS')) ensureNfs();
    if (kind.name.startsWith('iSCSI')) ensureIscsi();
    for (let k = 0; k < KILLS; k++) {
      const t = kind.target();
      kind.reset?.(t.local);
      const outOfOrder = k % 2 === 1 ? ['-W'] : [];
      const common = [
        'convert',
        '-O',
        kind.format,
        ...kind.flags,
        ...outOfOrder,
        '-m',
        String(WORKERS),
        '--buffer-size',
        String(BUFFER),
        '--checkpoint',
        `${INTERVAL}`,
        '--checksum',
        '--output',
        'json',
        SOURCE,
        t.url,
      ];
      // The rate limit makes the copy last ~1.5 s, so that a kill lands anywhere in it.
      const at = Math.round(250 + random() * 1400);
      const first = await blockconvAsync(
        [...common.slice(0, 1), '-r', '300M', '--progress', 'json', ...common.slice(1)],
        at,
      );
      const checkpoints = first.stdout
        .split('\n')
        .filter((l) => l.includes('"checkpoint"'))
        .map((l) => JSON.parse(l) as { done: number; dirtyEnd: number });
      const last = checkpoints.at(-1);
      // A kill may land before the target exists (a slow start on a loaded machine): nothing written yet.
      const reached = first.killed && fs.existsSync(t.local) ? writtenEnd(t.local, kind.format) : 0;
      // A qcow2 killed at any instant is consistent: leaked clusters at worst (qemu-img check exit 0 or 3), never corrupt.
      let leaks = 0;
      let repaired = false;
      if (kind.format === 'qcow2' && first.killed && fs.existsSync(t.local)) {
        const chk = qemuImg(['check', '-U', '--output=json', '-f', 'qcow2', t.local]);
        assert.ok(
          chk.code === 0 || chk.code === 3,
          `the killed run's qcow2: qemu-img check exit ${chk.code}: ${chk.out}`,
        );
        leaks = (JSON.parse(chk.stdout) as { leaks?: number }).leaks ?? 0;
        // Every other killed image is repaired by hand first, as an operator would.
        if (leaks && Math.floor(k / 2) % 2 === 0) {
          const fix = blockconv(['check', '-r', 'leaks', '-q', t.url]);
          assert.ok(fix.code === 0, `blockconv check -r leaks: exit ${fix.code}: ${fix.stderr}`);
          const after = qemuImg(['check', '-U', '-f', 'qcow2', t.local]);
          assert.is(after.code, 0, `qemu-img check after blockconv check -r leaks: ${after.out}`);
          repaired = true;
        }
      }
      const second = blockconv([...common, '--resume']);
      assert.is(second.code, 0, `resume after a kill at ${at} ms: ${second.stderr}`);
      const result = JSON.parse(second.stdout.trim().split('\n').at(-1)!) as { checksum: string; resumedFrom?: number };
      assert.is(result.checksum, sourceDigest, "the digest of the resumed copy is the source's");
      const cmp = qemuImg([
        'compare',
        '-U',
        '-f',
        'raw',
        ...(t.qemu[0] === '--image-opts' ? ['-F', 'raw', SOURCE, LUN.local] : ['-F', kind.format, SOURCE, t.qemu[0]!]),
      ]);
      assert.is(cmp.code, 0, `qemu-img compare: ${cmp.out}`);
      if (kind.format === 'qcow2') {
        const chk = qemuImg(['check', '-U', '-f', 'qcow2', t.local]);
        assert.is(chk.code, 0, `qemu-img check: ${chk.out}`);
      }
      const from = result.resumedFrom ?? 0;
      // What the killed run had written past the checkpoint the resume started from: copied again.
      const recopied = Math.max(0, reached - from);
      if (first.killed) {
        // The resume starts at the last checkpoint the killed run saved (its JSON lines may lag the file by one).
        assert.ok(!last || from >= last.done, `resumed from ${from}, but a checkpoint at ${last?.done} was saved`);
        assert.ok(
          recopied <= INTERVAL + WORKERS * BUFFER,
          `re-copied ${recopied} bytes > ${INTERVAL} + ${WORKERS} x ${BUFFER}`,
        );
      }
      if (REPORT) {
        fs.appendFileSync(
          REPORT,
          `${JSON.stringify({
            kind: kind.name,
            kill: k,
            killAtMs: at,
            killed: first.killed,
            outOfOrder: outOfOrder.length > 0,
            checkpoints: checkpoints.length,
            resumedFrom: from,
            reached,
            recopied,
            leaks,
            repaired,
            bound: INTERVAL + WORKERS * BUFFER,
          })}\n`,
        );
      }
      if (kind.name !== 'iSCSI LUN') fs.rmSync(t.local, { force: true });
    }
  });
}

test('a source changed between the runs is refused, naming it; the state stays for a later --resume', async () => {
  const src = join(dir, 'changing.raw');
  fs.copyFileSync(SOURCE, src);
  const target = join(dir, 'changing-target.qcow2');
  const args = ['convert', '-O', 'qcow2', '--checkpoint', '64M', '--output', 'json', src, target];
  const first = await blockconvAsync([args[0]!, '-r', '300M', ...args.slice(1)], 900);
  assert.ok(first.killed);
  const fd = fs.openSync(src, 'r+');
  fs.writeSync(fd, Buffer.from('changed'), 0, 7, 10 * MiB);
  fs.closeSync(fd);
  const r = blockconv([...args, '--resume']);
  assert.is(r.code, 1);
  assert.match(r.stderr, /cannot resume: source 1 was .*changing\.raw.*version/);
  assert.is(r.stderr.trim().split('\n').length, 1, 'one line');
  // Different output options: refused too.
  const c = blockconv(['convert', '-O', 'qcow2', '-c', '--checkpoint', '64M', src, target, '--resume']);
  assert.is(c.code, 1);
  assert.match(c.stderr, /cannot resume: (source 1|option compress)/);
  // Starting over (no --resume) replaces the state, and succeeds.
  const again = blockconv(args);
  assert.is(again.code, 0, again.stderr);
  assert.is(qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', src, target]).code, 0);
  const left = fs
    .readdirSync(stateDir)
    .filter((f) => f.endsWith('.json') && fs.readFileSync(join(stateDir, f), 'utf8').includes('changing-target'));
  assert.is(left.length, 0, 'no state left once the copy succeeds');
});

test('SIGINT: exit 130, the message says how much is durable and how to continue; --resume continues', async () => {
  const target = join(dir, 'sigint.raw');
  const args = ['convert', '--checkpoint', '64M', SOURCE, target];
  const child = spawn(process.execPath, [BIN, args[0]!, '-r', '300M', ...args.slice(1)], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => {
    stderr += d.toString();
  });
  setTimeout(() => child.kill('SIGINT'), 1200);
  const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  assert.is(code, 130, stderr);
  assert.match(
    stderr,
    /convert cancelled \(interrupted by SIGINT\): target .*sigint\.raw is incomplete; \d+ bytes are durable: the same command with --resume continues \(state: /,
  );
  const r = blockconv([...args, '--resume', '--output', 'json']);
  assert.is(r.code, 0, r.stderr);
  assert.ok((JSON.parse(r.stdout) as { resumedFrom: number }).resumedFrom > 0);
  assert.is(qemuImg(['compare', '-f', 'raw', '-F', 'raw', SOURCE, target]).code, 0);
});

test('the NFS server dies mid-copy: a clear error within the timeout; back on the same address, --resume finishes the copy', async () => {
  ensureNfs();
  // A forwarder on a fixed port stands for the server: killed, then listening again.
  const port = await new Promise<number>((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
  const sockets = new Set<net.Socket>();
  const listen = (): Promise<net.Server> =>
    new Promise((resolve) => {
      const server = net.createServer((client) => {
        const upstream = net.connect(2049, '127.0.0.1');
        for (const s of [client, upstream]) {
          sockets.add(s);
          s.on('error', () => {});
          s.on('close', () => sockets.delete(s));
        }
        client.pipe(upstream).pipe(client);
      });
      server.listen(port, '127.0.0.1', () => resolve(server));
    });
  let server = await listen();
  const name = uniq('resume-dies', 'qcow2');
  nfsFiles.push(join(EXPORT_DIR, name));
  const url = `${BASE_URL}/${name}?version=4&nfsport=${port}`;
  const args = ['convert', '-O', 'qcow2', '--checkpoint', '64M', '--target-opts', 'timeout=3', SOURCE, url];
  const child = spawn(process.execPath, [BIN, args[0]!, '-r', '300M', '--progress', 'json', ...args.slice(1)], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => {
    stderr += d.toString();
  });
  // Once the first checkpoint is out (the JSON lines say), the server goes.
  await new Promise<void>((resolve) => {
    let out = '';
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (/"event":"checkpoint","done":[1-9]/.test(out)) resolve();
    });
  });
  server.close();
  for (const s of sockets) s.destroy();
  const started = Date.now();
  const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  assert.is(code, 1, stderr);
  assert.ok(Date.now() - started < 30_000, 'bounded');
  assert.is(stderr.trim().split('\n').length, 1, `one line: ${stderr}`);
  assert.match(stderr, /bytes are durable: the same command with --resume continues/, stderr);
  server = await listen();
  try {
    const r = await blockconvAsync([...args, '--resume', '--output', 'json']);
    assert.is(r.code, 0, r.stderr);
    assert.ok((JSON.parse(r.stdout) as { resumedFrom: number }).resumedFrom > 0);
    assert.is(qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', SOURCE, join(EXPORT_DIR, name)]).code, 0);
    assert.is(qemuImg(['check', '-f', 'qcow2', join(EXPORT_DIR, name)]).code, 0);
  } finally {
    server.close();
    for (const s of sockets) s.destroy();
  }
});

test.run();
