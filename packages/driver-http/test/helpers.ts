/**
 * Fixtures for the HTTP driver tests: Debian's nginx on loopback (plain, TLS with a
 * self-signed certificate, Basic authentication, a location without Range), a test
 * server of our own that injects failures, and the CLI.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import { freePort, run, tmpDir as scratchDir } from '../../../tools/test/fixtures.js';

export { CLI, MiB, cli, compare, failure, freePort, run, sparseImage } from '../../../tools/test/fixtures.js';

export function tmpDir(): string {
  return scratchDir('blockconv-http-');
}

export interface Nginx {
  /** http://127.0.0.1:PORT (no trailing slash); the root is `root`. */
  readonly http: string;
  readonly https: string;
  /** The self-signed certificate of the https server (its own CA). */
  readonly cert: string;
  readonly user: string;
  readonly password: string;
  stop(): Promise<void>;
}

/**
 * nginx serving `root`: /  with Range; /noranges/ without (max_ranges 0); /private/
 * behind Basic authentication; /forbidden/ denied. Plain HTTP and TLS.
 */
export async function nginx(dir: string, root: string): Promise<Nginx> {
  const [port, tlsPort] = [await freePort(), await freePort()];
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  run('openssl', [
    'req',
    '-x509',
    '-newkey',
    'rsa:2048',
    '-nodes',
    '-keyout',
    key,
    '-out',
    cert,
    '-days',
    '2',
    '-subj',
    '/CN=localhost',
    '-addext',
    'subjectAltName=IP:127.0.0.1,DNS:localhost',
  ]);
  const user = 'alice';
  const password = 'correct-horse-battery';
  fs.writeFileSync(path.join(dir, 'htpasswd'), `${user}:${run('openssl', ['passwd', '-apr1', password]).trim()}\n`);
  fs.mkdirSync(path.join(dir, 'tmp'), { recursive: true });
  const locations = `
      location / { }
      location /noranges/ { alias ${root}/; max_ranges 0; }
      location /private/ { alias ${root}/; auth_basic "blockconv"; auth_basic_user_file ${dir}/htpasswd; }
      location /forbidden/ { deny all; }
      location /moved/ { rewrite ^/moved/(.*)$ /$1 redirect; }`;
  const conf = `
daemon off; master_process off; worker_processes 1;
error_log ${dir}/error.log; pid ${dir}/nginx.pid;
events { worker_connections 256; }
http {
  access_log ${dir}/access.log;
  client_body_temp_path ${dir}/tmp; proxy_temp_path ${dir}/tmp; fastcgi_temp_path ${dir}/tmp; uwsgi_temp_path ${dir}/tmp; scgi_temp_path ${dir}/tmp;
  sendfile on; keepalive_requests 100000;
  server { listen 127.0.0.1:${port}; root ${root}; ${locations} }
  server { listen 127.0.0.1:${tlsPort} ssl; ssl_certificate ${cert}; ssl_certificate_key ${key}; root ${root}; ${locations} }
}`;
  fs.writeFileSync(path.join(dir, 'nginx.conf'), conf);
  const child: ChildProcess = spawn('nginx', ['-c', path.join(dir, 'nginx.conf'), '-p', dir], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
  });
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (child.exitCode !== null)
      throw new Error(
        `nginx exited: ${err} ${fs.existsSync(path.join(dir, 'error.log')) ? fs.readFileSync(path.join(dir, 'error.log'), 'utf8') : ''}`,
      );
    const ok = await new Promise<boolean>((r) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        r(true);
      });
      s.once('error', () => r(false));
    });
    if (ok) break;
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`nginx did not start: ${err}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  return {
    http: `http://127.0.0.1:${port}`,
    https: `https://127.0.0.1:${tlsPort}`,
    cert,
    user,
    password,
    stop: async () => {
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

export interface Faults {
  /** Reset the connection after this many body bytes, on the first `resets` responses. */
  resetAfter?: number;
  resets?: number;
  /** Answer this status to the first `failures` requests. */
  failStatus?: number;
  failures?: number;
  /** Wait this long before answering the first `stalls` requests. */
  stallMs?: number;
  stalls?: number;
  /** Ignore Range (answer 200 with everything). */
  noRange?: boolean;
  /** No Content-Length (chunked). */
  noLength?: boolean;
  /** Refuse HEAD with 405. */
  noHead?: boolean;
  /** Send this ETag and answer 412 to an If-Match naming another. */
  etag?: string;
}

/** A server of `image` whose misbehaviour `faults` (changeable while it runs) says. */
export async function faultServer(
  image: Buffer,
  faults: Faults = {},
): Promise<{ url: string; faults: Faults; requests: string[]; close(): Promise<void> }> {
  const requests: string[] = [];
  const sockets = new Set<net.Socket>();
  const server = http.createServer((req, res) => {
    requests.push(`${req.method} ${req.url} ${req.headers.range ?? ''}`.trim());
    const f = faults;
    if (req.url === '/loop') {
      res.writeHead(302, { location: '/loop' });
      res.end();
      return;
    }
    if (req.url === '/redirect') {
      res.writeHead(301, { location: '/disk.raw' });
      res.end();
      return;
    }
    if (req.url !== '/disk.raw') {
      res.writeHead(404);
      res.end();
      return;
    }
    const answer = (): void => {
      if (f.failures && f.failures > 0 && f.failStatus) {
        f.failures--;
        res.writeHead(f.failStatus);
        res.end();
        return;
      }
      if (req.method === 'HEAD' && f.noHead) {
        res.writeHead(405);
        res.end();
        return;
      }
      if (f.etag && req.headers['if-match'] && req.headers['if-match'] !== f.etag) {
        res.writeHead(412);
        res.end();
        return;
      }
      if (f.etag) res.setHeader('etag', f.etag);
      const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
      let body = image;
      const headers: Record<string, string | number> = {};
      if (range && !f.noRange) {
        const a = Number(range[1]);
        const b = Math.min(Number(range[2]), image.length - 1);
        body = image.subarray(a, b + 1);
        headers['content-range'] = `bytes ${a}-${b}/${image.length}`;
        res.statusCode = 206;
      } else {
        res.statusCode = 200;
        if (!f.noRange) headers['accept-ranges'] = 'bytes';
      }
      if (!f.noLength) headers['content-length'] = body.length;
      for (const [k, v] of Object.entries(headers)) res.setHeader(k, v);
      if (req.method === 'HEAD') {
        res.end();
        return;
      }
      if (f.resets && f.resets > 0 && f.resetAfter !== undefined && body.length > f.resetAfter) {
        f.resets--;
        res.write(body.subarray(0, f.resetAfter), () => res.socket?.destroy());
        return;
      }
      res.end(body);
    };
    if (f.stalls && f.stalls > 0 && f.stallMs) {
      f.stalls--;
      setTimeout(answer, f.stallMs);
    } else {
      answer();
    }
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as net.AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    faults,
    requests,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}
