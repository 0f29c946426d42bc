// The core's conformance kit against real NBD servers: nbdkit's memory and file plugins (multi-conn,
// TCP), qemu-nbd over a raw file and over a qcow2 image, and nbdkit with 4 KiB minimum blocks.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { conformance } from '@blockconv/core/testkit';
import { openNbd } from '../../src/index.js';
import { MiB, nbdkit, qemuNbd, run, tmpDir, type Server } from '../helpers.js';

function withServer(start: (dir: string) => Promise<Server>) {
  return async () => {
    const dir = tmpDir();
    const server = await start(dir);
    return {
      backend: await openNbd(server.url),
      reopen: () => openNbd(server.url),
      openReadOnly: () => openNbd(server.url, { readOnly: true }),
      cleanup: async () => {
        await server.stop();
        fs.rmSync(dir, { recursive: true, force: true });
      },
    };
  };
}

conformance('nbd (nbdkit memory, TCP, multi-conn)', {
  open: withServer((dir) => nbdkit(dir, ['memory', '16M'], true)),
});

conformance('nbd (qemu-nbd raw)', {
  open: withServer((dir) => {
    const file = path.join(dir, 'disk.raw');
    run('qemu-img', ['create', '-q', '-f', 'raw', file, '16M']);
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 3M 1M', file]);
    return qemuNbd(dir, file, 'raw');
  }),
});

conformance('nbd (qemu-nbd qcow2)', {
  open: withServer((dir) => {
    const file = path.join(dir, 'disk.qcow2');
    run('qemu-img', ['create', '-q', '-f', 'qcow2', file, '16M']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 3M 1M', file]);
    return qemuNbd(dir, file, 'qcow2');
  }),
});

conformance('nbd (nbdkit, 4 KiB minimum block, 256 KiB maximum)', {
  open: withServer((dir) =>
    nbdkit(dir, [
      '--filter=blocksize-policy',
      'memory',
      `${16 * MiB}`,
      'blocksize-minimum=4096',
      'blocksize-preferred=65536',
      'blocksize-maximum=262144',
      'blocksize-error-policy=error',
    ]),
  ),
});

conformance('nbd (nbdkit file plugin)', {
  open: withServer((dir) => {
    const file = path.join(dir, 'disk.raw');
    run('qemu-img', ['create', '-q', '-f', 'raw', file, '16M']);
    run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 3M 1M', file]);
    return nbdkit(dir, ['file', file]);
  }),
});
