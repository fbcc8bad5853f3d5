// api/openapi.json against the OpenAPI 3.1 schema (@seriousme/openapi-schema-validator,
// pinned in package.json), and the server serves exactly that document.
//   node validate_openapi.mjs PATH/TO/gemmaforge
import {spawn} from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import {fileURLToPath} from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
let Validator;
try {
  ({Validator} = await import('@seriousme/openapi-schema-validator'));
} catch {
  console.log('SKIP: @seriousme/openapi-schema-validator is not installed (cd tests/clients && npm ci)');
  process.exit(77);
}
const file = path.join(HERE, '..', '..', 'api', 'openapi.json');
const doc = JSON.parse(fs.readFileSync(file, 'utf8'));
const v = new Validator();
const res = await v.validate(doc);
if (!res.valid || v.version !== '3.1') {
  console.log(`FAIL api/openapi.json is not valid OpenAPI 3.1 (version ${v.version}):\n${JSON.stringify(res.errors, null, 1).slice(0, 4000)}`);
  process.exit(1);
}
console.log('ok   api/openapi.json validates as OpenAPI 3.1');

// the document the server serves is the file
const data = fs.mkdtempSync(path.join(os.tmpdir(), 'gf-openapi-'));
let served_ok = false;
const server = spawn(process.argv[2], ['serve', '--model', path.join(HERE, '..', 'fixtures', 'dense'), '--data', data, '--port', '0',
                                       '--api-key', 'openapi-test-key-0123456789', '--no-train', '--no-export'],
                     {stdio: ['ignore', 'pipe', 'ignore']});
try {
  const port = await new Promise((resolve, reject) => {
    readline.createInterface({input: server.stdout}).once('line', l => {
      const m = /:(\d+)$/.exec(l); m ? resolve(m[1]) : reject(new Error(l));
    });
    server.once('exit', c => reject(new Error(`the server exited (${c})`)));
  });
  const r = await fetch(`http://127.0.0.1:${port}/v1/openapi.json`, {headers: {Authorization: 'Bearer openapi-test-key-0123456789'}});
  const served = await r.text();
  served_ok = r.status === 200 && r.headers.get('content-type') === 'application/json' && served === fs.readFileSync(file, 'utf8');
  console.log(served_ok ? 'ok   /v1/openapi.json serves it'
                        : `FAIL /v1/openapi.json: ${r.status} ${r.headers.get('content-type')}, ${served.length} bytes`);
} finally {
  server.kill('SIGTERM');
  await new Promise(r => (server.exitCode !== null ? r() : server.once('exit', r)));
  fs.rmSync(data, {recursive: true, force: true});
}
console.log(served_ok ? '\n2 passed, 0 failed' : '\n1 passed, 1 failed');
process.exit(served_ok ? 0 : 1);
