// Runs the iSCSI suites when the libiscsi addon is built; on a machine without libiscsi
// the rest of the workspace still tests, and this file reports one skipped test.
import { suite } from 'uvu';
import { available, loadError } from '@blockconv/libiscsi';

if (available) {
  await import('./suites/conformance.js');
  await import('./suites/convert.js');
  await import('./suites/errors.js');
} else {
  const skipped = suite('iscsi driver');
  skipped.skip(`libiscsi addon not built: ${loadError?.message}`, () => {});
  skipped.run();
}
