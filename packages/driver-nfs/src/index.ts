/**
 * @blockconv/driver-nfs: the "nfs" protocol over libnfs. Register with
 * `registry.register(...drivers)`.
 */
import { available, loadError } from '@blockconv/libnfs';
import type { BlockDriver } from '@blockconv/core';
import { nfsDriver } from './nfs.js';

// Fail the import when the addon is missing, so that the CLI reports this package as
// not loadable and names what nfs:// needs, instead of failing at the first open.
if (!available) throw loadError!;

export { nfsDriver, openNfs, createNfs, NfsBackend, type ConnectionStats } from './nfs.js';

export const drivers: readonly BlockDriver[] = [nfsDriver];
export default drivers;
