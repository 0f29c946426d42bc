/**
 * What every command is given: the installed drivers, discovered on first use (a
 * command's --help or a usage error never pays for it), and whether --debug was given.
 */
import type { DriverRegistry } from '@blockconv/core';
import { discoverDrivers, type Discovery } from './discover.js';

export interface CommandContext {
  discovery?: Discovery;
  debug: boolean;
}

/** The registry; lazily listed driver packages are imported only when an image needs one. */
export async function registry(ctx: CommandContext): Promise<DriverRegistry> {
  ctx.discovery ??= await discoverDrivers();
  return ctx.discovery.registry;
}

/** The registry with every installed driver package imported: for listing them all, or a worker that takes any job. */
export async function registryWithAllDrivers(ctx: CommandContext): Promise<DriverRegistry> {
  const reg = await registry(ctx);
  await ctx.discovery!.loadAll();
  return reg;
}
