// The core's conformance kit against the real tgtd LUNs, 512 and 4096-byte blocks.
import { execFileSync } from 'node:child_process';
import { conformance } from '@blockconv/core/testkit';
import { openIscsi } from '../../src/index.js';
import { LUNS, ensureServer, wipeLun } from '../helpers.js';

ensureServer();

for (const lun of [LUNS.disk512, LUNS.disk4k]) {
  conformance(`iscsi (${lun.blockSize}-byte blocks)`, {
    open: async () => {
      wipeLun(lun.file);
      // Some old data through the backing file, so zeroing and block status have work.
      execFileSync('dd', [
        'if=/dev/urandom',
        `of=${lun.file}`,
        'bs=64K',
        'seek=40',
        'count=8',
        'conv=notrunc',
        'status=none',
      ]);
      return {
        backend: await openIscsi(lun.url),
        reopen: () => openIscsi(lun.url),
        openReadOnly: () => openIscsi(lun.url, { readOnly: true }),
      };
    },
  });
}
