// The in-memory backend is the reference for the conformance kit itself.
import { conformance } from '../src/testkit/index.js';
import { MemoryBackend } from '../src/index.js';

const MiB = 1024 * 1024;
let image: MemoryBackend | undefined;

conformance('mem', {
  open: async () => {
    const backend = new MemoryBackend({ size: 9 * MiB });
    image = backend;
    return { backend, reopen: async () => { image!.closed = false; return image!; } };
  },
});

conformance('mem, 4096-byte alignment, 64 KiB max transfer', {
  open: async () => ({ backend: new MemoryBackend({ size: 8 * MiB + 4096, limits: { requestAlignment: 4096, maxTransfer: 64 * 1024, optimalTransfer: 64 * 1024 } }) }),
});
