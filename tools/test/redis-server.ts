/**
 * The loopback Redis of tools/redis-server.sh for tests (BullMQ's store): started if it
 * is not running, stopped by the last test process that needed it if a test started it.
 */
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execFileSync } from 'node:child_process';
import { ensureSharedServer } from './shared-server.js';

const script = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../redis-server.sh');
const DIR = process.env.REDIS_DIR ?? '/var/tmp/blockconv-redis';
export const REDIS_URL = `redis://127.0.0.1:${process.env.REDIS_PORT ?? 6390}`;

export function ensureServer(): void {
  ensureSharedServer(script, path.join(DIR, 'state'));
}

/** Restarts the server (jobs survive: append-only file). */
export function restartServer(): void {
  execFileSync('bash', [script, 'restart'], { stdio: 'ignore' });
}
