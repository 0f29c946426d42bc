/**
 * @blockconv/driver-qcow2: the qcow2 format (read, write, create, check), layered on
 * any protocol backend. Register with `registry.register(...drivers)`.
 */
import type { BlockDriver } from '@blockconv/core';
import { qcow2Driver } from './driver.js';

export { qcow2Driver, openQcow2, DEFAULT_L2_CACHE_SIZE, MAX_CHAIN_DEPTH, OPEN_OPTIONS } from './driver.js';
export { Qcow2Backend } from './backend.js';
export {
  parseHeader,
  headerReadLength,
  type Qcow2Header,
  type FeatureName,
  type HeaderExtension,
  type BitmapsExtension,
} from './header.js';
export type { Snapshot } from './snapshots.js';

export const drivers: readonly BlockDriver[] = [qcow2Driver];
export default drivers;
