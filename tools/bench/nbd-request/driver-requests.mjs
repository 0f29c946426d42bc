// Client CPU per NBD request with blockconv's NbdConnection (driver-nbd): QD requests of
// SIZE bytes in flight, N in all; the same loop as libnbd-requests.c.
// Usage: node driver-requests.mjs URL N SIZE QD [w]
import { NbdConnection, parseNbdUrl } from '../../../packages/driver-nbd/dist/index.js';

const [, , url, nStr, sizeStr, qdStr, mode] = process.argv;
const N = Number(nStr),
  SIZE = Number(sizeStr),
  QD = Number(qdStr),
  write = mode === 'w';
const u = parseNbdUrl(url);
const c = await NbdConnection.open(u.endpoint, { exportName: u.exportName, location: url, timeoutMs: 30000 });
const size = c.info.size;
const bufs = Array.from({ length: QD }, () => Buffer.alloc(SIZE, 1));
let issued = 0,
  off = 0;
const t0 = process.hrtime.bigint(),
  c0 = process.cpuUsage();
async function worker(buf) {
  while (issued < N) {
    issued++;
    const o = off;
    off += SIZE;
    if (off + SIZE > size) off = 0;
    await (write ? c.write(o, buf, false) : c.read(o, SIZE, buf));
  }
}
await Promise.all(bufs.map(worker));
const wall = Number(process.hrtime.bigint() - t0) / 1e9,
  cpu = process.cpuUsage(c0);
console.log(
  `driver-nbd ${write ? 'write' : 'read'} size=${SIZE} qd=${QD} n=${N}: wall ${wall.toFixed(3)} s, ${(N / wall).toFixed(0)} req/s, cpu user ${(cpu.user / N).toFixed(2)} us/req sys ${(cpu.system / N).toFixed(2)} us/req`,
);
await c.close();
