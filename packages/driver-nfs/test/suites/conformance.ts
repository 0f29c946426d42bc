// The core's conformance kit against files on the real loopback NFS-Ganesha, v3 and v4.
import { execFileSync } from 'node:child_process';
import { conformance } from '@blockconv/core/testkit';
import { createNfs, openNfs } from '../../src/index.js';
import { ensureServer, scratch } from '../helpers.js';

ensureServer();
const MiB = 1024 * 1024;

for (const version of [3, 4]) {
  conformance(`nfs (NFSv${version})`, {
    open: async () => {
      const s = scratch('conf', version === 4 ? '?version=4' : '');
      await createNfs(s.url, 9 * MiB);
      // Some old data through the export's directory, so zeroing has something to do.
      execFileSync('dd', [
        'if=/dev/urandom',
        `of=${s.local}`,
        'bs=64K',
        'seek=40',
        'count=8',
        'conv=notrunc',
        'status=none',
      ]);
      return {
        backend: await openNfs(s.url),
        reopen: () => openNfs(s.url),
        openReadOnly: () => openNfs(s.url, { readOnly: true }),
        cleanup: async () => s.remove(),
      };
    },
  });
}
