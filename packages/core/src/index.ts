/**
 * @blockconv/core: the driver interface, the registry that resolves locations to
 * drivers, and the convert/compare engines. Drivers live in their own packages.
 */
export * from './types.js';
export * from './errors.js';
export {
  redactCredentials,
  redactLocation,
  declareSecretParameters,
  isSecretParameter,
  registerSecret,
  REDACTED,
  GENERIC_SECRET_WORDS,
  MIN_SCANNED_SECRET,
} from './redact.js';
export {
  DriverRegistry,
  type DriverLoader,
  matchesMagic,
  parseLocation,
  resolveRelative,
  roundUp,
  roundDown,
  type ParsedLocation,
  type ImageOpenOptions,
  type ImageCreateOptions,
} from './registry.js';
export { chainStatus } from './status.js';
export { forwardBackend } from './forward.js';
export { gateBackend, ungated, isGated, checkLimits, type GateFacts } from './gate.js';
export {
  convert,
  startConvert,
  ConvertJob,
  checkCopyOffload,
  DEFAULT_WORKERS,
  AUTO_MAX_WORKERS,
  DEFAULT_BUFFER_SIZE,
  DEFAULT_MIN_SPARSE,
  MAX_WORKERS,
  type ConvertOptions,
  type ConvertProgress,
  type ConvertResult,
  DEFAULT_CHECKPOINT_BYTES,
  DEFAULT_CHECKPOINT_SECONDS,
  HEAD_BYTES,
  RESUME_STATE_KIND,
  RESUME_STATE_VERSION,
  checkResume,
  checkStateShape,
  identifyConvert,
  type CheckpointSchedule,
  type CheckpointProgress,
  type ConvertIdentity,
  type ImageIdentity,
  type ResumeState,
  FanoutTarget,
  UnopenedTarget,
  type FailedTarget,
  type TargetOutcome,
  openTargets,
  type OpenTargetsOptions,
} from './convert/index.js';
export { WorkerGovernor } from './autotune.js';
export { compareImages, type CompareOptions, type CompareResult } from './compare.js';
export { mapImage, type MapEntry } from './map.js';
export { parseSize, formatSize } from './size.js';
export { ZeroScanner } from './zeroscan.js';
export { SegmentList, piecesAroundHoles } from './segments.js';
export { adaptApi1Driver } from './compat/api1.js';
export { settleAll } from './settle.js';
export { timeoutOption } from './driver-options.js';
export {
  MemoryBackend,
  createMemoryDriver,
  type MemoryBackendOptions,
  type MemoryOp,
  type MemoryOpRecord,
} from './memory.js';
export {
  checksumImage,
  BLKHASH_ALGORITHM,
  BLKHASH_BLOCK_SIZE,
  BlockHash,
  HashPool,
  zeroBlockDigest,
  type BlockHashState,
  type ChecksumOptions,
  type ChecksumResult,
} from './checksum/index.js';
