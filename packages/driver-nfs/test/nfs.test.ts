// Runs the NFS suites when the libnfs addon is built; on a machine without libnfs the
// rest of the workspace still tests, and this file reports one skipped test.
import { suite } from 'uvu';
import { available, loadError } from '@blockconv/libnfs';

if (available) {
  await import('./suites/conformance.js');
  await import('./suites/convert.js');
  await import('./suites/errors.js');
  await import('./suites/connections.js');
  await import('./suites/qcow2.js');
} else {
  const skipped = suite('nfs driver');
  skipped.skip(`libnfs addon not built: ${loadError?.message}`, () => {});
  skipped.run();
}
