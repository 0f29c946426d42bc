/**
 * `blockconv serve`: exports any image blockconv opens (a qcow2 on NFS, a LUN, a local
 * file) over NBD, for nbdcopy, qemu-img, qemu-io, virt-v2v or blockconv itself. The NBD
 * server is @blockconv/driver-nbd's (loaded only by this command). NBD has no TLS here,
 * so it listens on a Unix socket or on loopback unless --allow-remote-without-tls says
 * otherwise; it serves until SIGINT/SIGTERM, then finishes the requests in flight,
 * flushes and closes the image.
 */
import { existsSync, lstatSync, unlinkSync } from 'node:fs';
import { isIP } from 'node:net';
import { InvalidArgumentError, Option, type Command } from 'commander';
import { BlockError, formatSize, redactLocation, type BlockBackend, type CacheMode } from '@blockconv/core';
import { registry, type CommandContext } from '../context.js';
import { CACHE_MODES, keyValues, outputOption } from '../options.js';

type DriverNbd = typeof import('@blockconv/driver-nbd');

async function loadNbd(): Promise<DriverNbd> {
  try {
    return await import('@blockconv/driver-nbd');
  } catch (err) {
    throw new BlockError(
      'ENODRIVER',
      `blockconv serve needs @blockconv/driver-nbd (npm install @blockconv/driver-nbd): ${(err as Error).message.split('\n')[0]}`,
    );
  }
}

interface ServeFlags {
  format?: string;
  readOnly?: boolean;
  socket?: string;
  port?: number;
  bind: string;
  exportName: string;
  allowRemoteWithoutTls?: boolean;
  cache: CacheMode;
  opts?: Record<string, string>;
  output: 'human' | 'json';
}

function isLoopback(address: string): boolean {
  return address === 'localhost' || address === '::1' || /^127\./.test(address);
}

function portOption(v: string): number {
  const n = Number(v);
  if (!/^\d+$/.test(v) || n < 1 || n > 65535)
    throw new InvalidArgumentError('port must be an integer from 1 to 65535.');
  return n;
}

export function addServeCommand(program: Command, ctx: CommandContext): void {
  program
    .command('serve')
    .description('Export an image over NBD (block status, zero, trim, flush; many clients at once) until interrupted.')
    .argument('<image>', 'path or URL of the image (any installed driver and format)')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .option('-r, --read-only', 'refuse writes')
    .option('--socket <path>', 'listen on this Unix socket (clients: nbd+unix:///?socket=PATH)')
    .option('-p, --port <n>', 'listen on this TCP port (default 10809 when no --socket)', portOption)
    .option('-b, --bind <address>', 'TCP address to listen on', '127.0.0.1')
    .option('-x, --export-name <name>', "the export's name, which clients ask for", '')
    .option(
      '--allow-remote-without-tls',
      'allow --bind to a non-loopback address: NBD here has no TLS and no authentication, so anyone who reaches the port can read (and without -r, write) the image',
    )
    .addOption(new Option('-t, --cache <mode>', 'cache mode of the image').choices(CACHE_MODES).default('writeback'))
    .addOption(new Option('--opts <k=v,...>', 'open options of the image, driver-specific').argParser(keyValues))
    .addOption(outputOption('how to announce the address: human (stderr) or json (a line on stdout)'))
    .addHelpText(
      'after',
      `
Examples:
  blockconv serve --socket /tmp/disk.sock disk.qcow2        # nbd+unix:///?socket=/tmp/disk.sock
  blockconv serve -r -p 10809 nfs://filer/vms/template.qcow2 # nbd://127.0.0.1:10809/
  nbdcopy 'nbd+unix:///?socket=/tmp/disk.sock' copy.raw`,
    )
    .action(async (image: string, opts: ServeFlags) => {
      const tcp = checkServeFlags(image, opts);
      const nbd = await loadNbd();
      const reg = await registry(ctx);
      const img = await reg.open(image, {
        format: opts.format,
        readOnly: opts.readOnly === true,
        cache: opts.cache,
        options: opts.opts,
      });
      const where = redactLocation(image);
      const server = new nbd.NbdServer(img, {
        exportName: opts.exportName,
        readOnly: opts.readOnly,
        onConnectionError: (err, client) => process.stderr.write(`blockconv serve: ${client}: ${err.message}\n`),
      });
      const socketPath = await listen(server, img, opts, tcp);
      const readOnly = opts.readOnly === true || img.readOnly;
      announce(opts, exportUrl(opts, socketPath), where, img, readOnly);
      const signal = await awaitStopSignal(where);
      // Finish what clients asked, then make it durable (unless -t unsafe), then close.
      await server.close();
      try {
        if (!readOnly) await img.flush();
      } finally {
        await img.close();
        if (socketPath && existsSync(socketPath)) unlinkSync(socketPath);
      }
      if (opts.output === 'json')
        process.stdout.write(`${JSON.stringify({ event: 'stopped', signal, served: server.stats.served })}\n`);
      else process.stderr.write(`blockconv serve: stopped (${signal}) after ${server.stats.served} client(s)\n`);
    });
}

/** Refuses what would serve an image somewhere it was not meant to go; returns whether it listens on TCP (else a Unix socket). */
function checkServeFlags(image: string, opts: ServeFlags): boolean {
  if (opts.socket !== undefined && opts.port !== undefined)
    throw new BlockError('EINVAL', '--socket and --port exclude each other');
  const tcp = opts.socket === undefined;
  if (tcp && !isLoopback(opts.bind) && !opts.allowRemoteWithoutTls) {
    throw new BlockError(
      'EINVAL',
      `--bind ${opts.bind} is not a loopback address: NBD here has no TLS or authentication; add --allow-remote-without-tls to serve ${redactLocation(image)} to the network anyway`,
    );
  }
  if (tcp && opts.bind !== 'localhost' && isIP(opts.bind) === 0)
    throw new BlockError('EINVAL', `--bind ${opts.bind}: expected an IP address`);
  return tcp;
}

/** Listens on the TCP address or the Unix socket (returned); if it cannot, the image is closed and the error says where. */
async function listen(
  server: InstanceType<DriverNbd['NbdServer']>,
  img: BlockBackend,
  opts: ServeFlags,
  tcp: boolean,
): Promise<string | undefined> {
  try {
    if (tcp) {
      await server.listen({ host: opts.bind, port: opts.port ?? 10809 });
      return undefined;
    }
    const socketPath = opts.socket!;
    // A socket file left by an earlier server is replaced; anything else is not.
    if (existsSync(socketPath) && lstatSync(socketPath).isSocket()) unlinkSync(socketPath);
    await server.listen({ path: socketPath });
    return socketPath;
  } catch (err) {
    await img.close().catch(() => {});
    const e = err as NodeJS.ErrnoException;
    const at = tcp ? `${opts.bind}:${opts.port ?? 10809}` : opts.socket!;
    throw new BlockError(
      e.code === 'EADDRINUSE' ? 'EINVAL' : 'EIO',
      e.code === 'EADDRINUSE' ? `${at} is already in use` : `cannot listen on ${at}: ${e.message}`,
    );
  }
}

/** The URL clients give: nbd://HOST:PORT/NAME, or nbd+unix:///NAME?socket=PATH. */
function exportUrl(opts: ServeFlags, socketPath: string | undefined): string {
  const name = encodeURIComponent(opts.exportName);
  if (socketPath === undefined)
    return `nbd://${opts.bind.includes(':') ? `[${opts.bind}]` : opts.bind}:${opts.port ?? 10809}/${name}`;
  // The socket path as a query value: characters that would end or change it are escaped.
  return `nbd+unix:///${name}?socket=${socketPath.replace(/[%&#+ ?]/g, (c) => encodeURIComponent(c))}`;
}

function announce(opts: ServeFlags, url: string, where: string, img: BlockBackend, readOnly: boolean): void {
  if (opts.output === 'json') {
    process.stdout.write(`${JSON.stringify({ event: 'listening', url, image: where, size: img.size, readOnly })}\n`);
  } else {
    process.stderr.write(
      `blockconv serve: ${where} (${formatSize(img.size)}${readOnly ? ', read-only' : ''}) at ${url}; Ctrl-C stops\n`,
    );
  }
}

/** Resolves with the first SIGINT or SIGTERM, which stops serving cleanly; a second one while that waits exits at once. */
function awaitStopSignal(where: string): Promise<NodeJS.Signals> {
  return new Promise<NodeJS.Signals>((resolve) => {
    let stopping = false;
    const on = (sig: NodeJS.Signals): void => {
      if (stopping) {
        process.stderr.write(
          `blockconv serve: ${sig} again: exiting without waiting for clients or flushing ${where}\n`,
        );
        process.exit(sig === 'SIGINT' ? 130 : 143);
      }
      stopping = true;
      resolve(sig);
    };
    process.on('SIGINT', on);
    process.on('SIGTERM', on);
  });
}
