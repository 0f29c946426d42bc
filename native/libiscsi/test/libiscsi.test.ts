// Runs the binding's suites when the addon is built (libiscsi present at install time).
import { suite } from 'uvu';
import { available, loadError } from '../src/index.js';

if (available) {
  await import('./suites/binding.js');
} else {
  const skipped = suite('libiscsi binding');
  skipped.skip(`addon not built: ${loadError?.message}`, () => {});
  skipped.run();
}
