/**
 * The loopback tgtd of tools/iscsi-server.sh for tests: started if it is not running,
 * and left as found. Test processes register in the state dir; when a test run started
 * the server (marker file), the last one of them to exit stops it, so overlapping runs
 * neither pull the target from under each other nor leave it behind.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ensureSharedServer } from './shared-server.js';

const script = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../iscsi-server.sh');
const DIR = process.env.ISCSI_DIR ?? '/var/tmp/blockconv-iscsi';
const STATE_DIR = path.join(DIR, 'state');
/** Where the LUNs' backing files live (see tools/iscsi-server.sh for the list). */
export const LUN_DIR = path.join(DIR, 'lun');
export const PORTAL = '127.0.0.1:3260';
export const IQN = 'iqn.2026-11.org.blockconv';
export const CHAP_USER = 'blockconv';
/** The file holding the CHAP target's password (mode 600). */
export const CHAP_PASSWORD_FILE = path.join(STATE_DIR, 'chap-password');

/** The test LUNs: URL (without credentials), backing file, size and block size. */
export const LUNS = {
  disk512: {
    url: `iscsi://${PORTAL}/${IQN}:disk512/1`,
    file: path.join(LUN_DIR, 'disk512-1.img'),
    size: 64 << 20,
    blockSize: 512,
  },
  small: {
    url: `iscsi://${PORTAL}/${IQN}:disk512/2`,
    file: path.join(LUN_DIR, 'disk512-small.img'),
    size: 4 << 20,
    blockSize: 512,
  },
  binding: {
    url: `iscsi://${PORTAL}/${IQN}:disk512/3`,
    file: path.join(LUN_DIR, 'disk512-binding.img'),
    size: 16 << 20,
    blockSize: 512,
  },
  disk4k: {
    url: `iscsi://${PORTAL}/${IQN}:disk4k/1`,
    file: path.join(LUN_DIR, 'disk4k-1.img'),
    size: 64 << 20,
    blockSize: 4096,
  },
  chap: {
    url: `iscsi://${PORTAL}/${IQN}:chap/1`,
    file: path.join(LUN_DIR, 'chap-1.img'),
    size: 16 << 20,
    blockSize: 512,
  },
} as const;

/** Makes sure the target runs; idempotent within the process. */
export function ensureServer(): void {
  ensureSharedServer(script, STATE_DIR);
}

/** The CHAP target's password (made by the server script at its first start). */
export function chapPassword(): string {
  return fs.readFileSync(CHAP_PASSWORD_FILE, 'utf8').trim();
}

/** Deallocates a whole LUN through its backing file (reads as zeroes afterwards). */
export function wipeLun(file: string): void {
  const size = fs.statSync(file).size;
  execFileSync('fallocate', ['--punch-hole', '--offset', '0', '--length', String(size), file]);
}

/**
 * A TCP forwarder to the portal, so a test can make "the target" vanish without
 * stopping the shared tgtd: kill() resets every connection and stops listening;
 * freeze() keeps the connections open but forwards nothing more (a hung target).
 */
export async function iscsiProxy(): Promise<{ portal: string; kill(): void; freeze(): void }> {
  const net = await import('node:net');
  const sockets = new Set<import('node:net').Socket>();
  let frozen = false;
  const server = net.createServer((client) => {
    const upstream = net.connect(3260, '127.0.0.1');
    for (const [from, to] of [
      [client, upstream],
      [upstream, client],
    ] as const) {
      sockets.add(from);
      from.on('error', () => {});
      from.on('close', () => sockets.delete(from));
      from.on('data', (chunk: Buffer) => {
        if (!frozen) to.write(chunk);
      });
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as import('node:net').AddressInfo).port;
  return {
    portal: `127.0.0.1:${port}`,
    kill() {
      server.close();
      for (const s of sockets) s.resetAndDestroy();
    },
    freeze() {
      frozen = true;
    },
  };
}
