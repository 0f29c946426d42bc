export { main, buildProgram, describe } from './main.js';
export { discoverDrivers, type Discovery, type LoadedPackage, type FailedPackage } from './discover.js';
