/**
 * The loopback NFS-Ganesha of tools/nfs-server.sh for tests: started if it is not
 * running, and left as found. Test processes register in the state dir; when a test
 * run started the server (marker file), the last one of them to exit stops it, so
 * overlapping runs neither pull the server from under each other nor leave it behind.
 */
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ensureSharedServer } from './shared-server.js';

const script = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../nfs-server.sh');
export const EXPORT_DIR = process.env.NFS_EXPORT_DIR ?? '/var/tmp/blockconv-nfs/export';
const STATE_DIR = process.env.NFS_STATE_DIR ?? '/var/tmp/blockconv-nfs/state';
export const BASE_URL = 'nfs://127.0.0.1/export';
/** The small exports of tools/nfs-server.sh: a 128 MiB file system that fills up, one under an 8 MiB quota. */
export const SMALL_DIR = process.env.NFS_SMALL_DIR ?? '/var/tmp/blockconv-nfs/small';
export const QUOTA_DIR = process.env.NFS_QUOTA_DIR ?? '/var/tmp/blockconv-nfs/quota';
export const SMALL_URL = 'nfs://127.0.0.1/small';
export const QUOTA_URL = 'nfs://127.0.0.1/quota';

/** Makes sure the server runs; idempotent within the process. */
export function ensureServer(): void {
  ensureSharedServer(script, STATE_DIR);
}

/** A unique file name inside the export, for one test. */
export function scratchName(prefix: string): string {
  return `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 8)}.raw`;
}
