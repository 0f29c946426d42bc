// The in-memory backend is the reference for the conformance kit itself.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { conformance, pattern } from '../src/testkit/index.js';
import { MemoryBackend, gateBackend } from '../src/index.js';

const MiB = 1024 * 1024;
let image: MemoryBackend | undefined;

conformance('mem', {
  open: async () => {
    const backend = new MemoryBackend({ size: 9 * MiB });
    image = backend;
    return {
      backend,
      reopen: async () => {
        image!.closed = false;
        return image!;
      },
    };
  },
});

conformance('mem, 4096-byte alignment, 64 KiB max transfer', {
  open: async () => ({
    backend: new MemoryBackend({
      size: 8 * MiB + 4096,
      limits: { requestAlignment: 4096, maxTransfer: 64 * 1024, optimalTransfer: 64 * 1024 },
    }),
  }),
});

// A read-only driver checked for content and block status against a reference: data, a
// written run of zeroes (data that reads zero) and holes.
const reference = new Uint8Array(8 * MiB + 512);
reference.set(pattern(MiB, 9), 0);
reference.set(pattern(64 * 1024, 10), 5 * MiB);
async function readOnlyImage(): Promise<MemoryBackend> {
  const m = new MemoryBackend({ size: reference.length, limits: { requestAlignment: 512, maxTransfer: MiB } });
  await m.write(0, reference.subarray(0, 2 * MiB));
  await m.write(5 * MiB, reference.subarray(5 * MiB, 5 * MiB + 64 * 1024));
  return m;
}

conformance('mem, read-only, against its bytes', {
  readOnly: true,
  reference,
  open: async () => ({ backend: gateBackend(await readOnlyImage(), { readOnlyReason: 'a source' }) }),
});

const refDir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockconv-reference-'));
const refFile = path.join(refDir, 'reference.raw');
fs.writeFileSync(refFile, reference);
conformance('mem, read-only, against a raw file', {
  readOnly: true,
  reference: refFile,
  open: async () => ({ backend: gateBackend(await readOnlyImage(), { readOnlyReason: 'a source' }) }),
});
process.on('exit', () => fs.rmSync(refDir, { recursive: true, force: true }));
const referenceBackend = new MemoryBackend({ size: reference.length });
await referenceBackend.write(0, reference);
conformance('mem, read-only, against another backend', {
  readOnly: true,
  reference: referenceBackend,
  open: async () => ({ backend: gateBackend(await readOnlyImage(), { readOnlyReason: 'a source' }) }),
});
