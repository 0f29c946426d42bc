// The package installs on its own: packed as npm would publish it, installed with only
// the core beside it (its peer dependency) into an empty project, it opens an export.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { nbdkit, tmpDir } from '../helpers.js';

const test = suite('driver-nbd install');
const pkgDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

test('npm pack + npm install with only @blockconv/core: the driver loads and reads an export', async () => {
  const dir = tmpDir();
  try {
    const pack = (p: string): string =>
      path.join(
        dir,
        execFileSync('npm', ['pack', '--silent', '--pack-destination', dir, p], { encoding: 'utf8' })
          .trim()
          .split('\n')
          .pop()!,
      );
    const core = pack(path.resolve(pkgDir, '../core'));
    const nbd = pack(pkgDir);
    const app = path.join(dir, 'app');
    fs.mkdirSync(app);
    fs.writeFileSync(
      path.join(app, 'package.json'),
      JSON.stringify({ name: 'app', version: '1.0.0', type: 'module', private: true }),
    );
    execFileSync('npm', ['install', '--prefer-offline', '--no-audit', '--no-fund', '--ignore-scripts', core, nbd], {
      cwd: app,
      stdio: 'pipe',
    });
    assert.equal(
      fs.readdirSync(path.join(app, 'node_modules/@blockconv')).sort(),
      ['core', 'driver-nbd'],
      'nothing else of blockconv',
    );
    const server = await nbdkit(dir, ['pattern', '1M']);
    try {
      fs.writeFileSync(
        path.join(app, 'main.js'),
        `
        import { DriverRegistry } from '@blockconv/core';
        import { drivers } from '@blockconv/driver-nbd';
        // The protocol alone (the raw format is @blockconv/driver-raw's, not installed here).
        const nbd = new DriverRegistry().register(...drivers).protocols.find((d) => d.name === 'nbd');
        const img = await nbd.open(process.argv[2], { readOnly: true });
        const b = await img.read(8, 8);
        // One string: console.log colours numbers when FORCE_COLOR is set (nx sets it).
        console.log(img.size + ' ' + Buffer.from(b).readBigUInt64BE(0));
        await img.close();`,
      );
      const out = execFileSync(process.execPath, ['main.js', server.url], { cwd: app, encoding: 'utf8' });
      assert.is(out.trim(), '1048576 8', 'the pattern plugin stores each offset at itself');
    } finally {
      await server.stop();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
