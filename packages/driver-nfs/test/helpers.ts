/** Fixtures for the NFS driver tests: the loopback server, local and export paths. */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { BASE_URL, EXPORT_DIR, ensureServer, scratchName } from './server.js';

export { BASE_URL, EXPORT_DIR, ensureServer };

/** A fresh name in the export: its nfs:// URL, its local path, and a remover. */
export function scratch(prefix: string, query = ''): { url: string; local: string; remove(): void } {
  const name = scratchName(prefix);
  const local = path.join(EXPORT_DIR, name);
  return { url: `${BASE_URL}/${name}${query}`, local, remove: () => fs.rmSync(local, { force: true }) };
}

export { failure, run } from '../../../tools/test/fixtures.js';

/**
 * A TCP forwarder to the NFS port, so a test can make "the server" vanish without
 * stopping the shared ganesha: kill() drops every connection and stops listening.
 */
export async function nfsProxy(
  target = 2049,
): Promise<{ port: number; kill(): void; drop(): void; connections: number }> {
  let connections = 0;
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    connections++;
    const upstream = net.connect(target, '127.0.0.1');
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => sockets.delete(s));
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    get connections() {
      return connections;
    },
    /** Resets every connection but keeps listening: the client can reconnect. */
    drop() {
      for (const s of sockets) s.destroy();
    },
    kill() {
      server.close();
      for (const s of sockets) s.destroy();
    },
  };
}
