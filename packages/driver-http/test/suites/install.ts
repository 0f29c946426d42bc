// The package installs on its own: packed as npm would publish it, installed with only
// the core beside it (its peer dependency) into an empty project, it reads an image.
import { execFileSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { faultServer, tmpDir } from '../helpers.js';

const test = suite('driver-http install');
const pkgDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

test('npm pack + npm install with only @blockconv/core: the driver loads and reads an image', async () => {
  const dir = tmpDir();
  const image = crypto.randomBytes(1 << 20);
  const server = await faultServer(image);
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
    const http = pack(pkgDir);
    const app = path.join(dir, 'app');
    fs.mkdirSync(app);
    fs.writeFileSync(
      path.join(app, 'package.json'),
      JSON.stringify({ name: 'app', version: '1.0.0', type: 'module', private: true }),
    );
    execFileSync('npm', ['install', '--prefer-offline', '--no-audit', '--no-fund', '--ignore-scripts', core, http], {
      cwd: app,
      stdio: 'pipe',
    });
    assert.equal(
      fs.readdirSync(path.join(app, 'node_modules/@blockconv')).sort(),
      ['core', 'driver-http'],
      'nothing else of blockconv',
    );
    fs.writeFileSync(
      path.join(app, 'main.js'),
      `
      import { DriverRegistry } from '@blockconv/core';
      import { drivers } from '@blockconv/driver-http';
      // The protocol alone (the raw format is @blockconv/driver-raw's, not installed here).
      const http = new DriverRegistry().register(...drivers).protocols.find((d) => d.name === 'http');
      const img = await http.open(process.argv[2], {});
      const b = await img.read(1000, 16);
      // One string: console.log colours numbers when FORCE_COLOR is set (nx sets it).
      console.log(img.size + ' ' + img.readOnly + ' ' + Buffer.from(b).toString('hex'));
      await img.close();`,
    );
    const out = await new Promise<string>((resolve, reject) => {
      // Not execFileSync: the server answers from this process's event loop.
      import('node:child_process').then(({ execFile }) =>
        execFile(
          process.execPath,
          ['main.js', `${server.url}/disk.raw`],
          { cwd: app, encoding: 'utf8' },
          (err, stdout) => (err ? reject(err) : resolve(stdout)),
        ),
      );
    });
    assert.is(out.trim(), `${1 << 20} true ${image.subarray(1000, 1016).toString('hex')}`);
  } finally {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
