/**
 * @blockconv/driver-iscsi: the "iscsi" protocol over libiscsi. Register with
 * `registry.register(...drivers)`.
 */
import { available, loadError } from '@blockconv/libiscsi';
import type { BlockDriver } from '@blockconv/core';
import { iscsiDriver } from './iscsi.js';

// Fail the import when the addon is missing, so that the CLI reports this package as
// not loadable and names what iscsi:// needs, instead of failing at the first open.
if (!available) throw loadError!;

export { iscsiDriver, openIscsi, parseIscsiUrl, IscsiBackend, type IscsiUrl } from './iscsi.js';

export const drivers: readonly BlockDriver[] = [iscsiDriver];
export default drivers;
