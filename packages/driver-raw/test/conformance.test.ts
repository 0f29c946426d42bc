// The core's driver conformance kit against real sparse files, buffered and O_DIRECT.
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import { conformance } from '@blockconv/core/testkit';
import type { CacheMode } from '@blockconv/core';
import { createFile, openFile } from '../src/index.js';
import { diskTempDir, removeDir } from './helpers.js';

const MiB = 1024 * 1024;

for (const cache of ['writeback', 'none'] as const satisfies readonly CacheMode[]) {
  for (const size of [9 * MiB, 9 * MiB + 4096]) {
    conformance(`file (cache=${cache}, size ${size})`, {
      open: async () => {
        const dir = diskTempDir();
        const file = path.join(dir, 'img.raw');
        await createFile(file, size);
        // Some old data, so that zeroing and block status have something to do.
        execFileSync('dd', [
          'if=/dev/urandom',
          `of=${file}`,
          'bs=64K',
          'seek=40',
          'count=8',
          'conv=notrunc',
          'status=none',
        ]);
        return {
          backend: await openFile(file, { cache }),
          reopen: () => openFile(file, { cache }),
          openReadOnly: () => openFile(file, { cache, readOnly: true }),
          cleanup: async () => removeDir(dir),
        };
      },
    });
  }
}
