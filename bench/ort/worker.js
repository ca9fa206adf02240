// ONNX Runtime peer of `devpipe bench`: a persistent worker speaking the bench's pipe protocol
// (bench/README.md, "The worker protocol"), one JSON object per line on stdin and stdout.
//
//   node bench/ort/worker.js --ort DIR --model M.onnx --inputs I.safetensors --threads N
//
// DIR holds node_modules/onnxruntime-node (bench/ort/install.sh). The model is the workload
// exported by bench/ort/export_onnx.py; the inputs are devpipe's (input0, input1, ...).
// Session: intraOpNumThreads = N, one inter-op thread, sequential execution, all graph
// optimisations. Replies: start {"ready": true, ...}; run {"samples_ms", "cpu_ms", "checksum"};
// output {"ok": true} after writing the last output to a safetensors file (key "output");
// quit / end of input exits 0; any failure is answered {"error": "..."} and exits 1.
'use strict';
const fs = require('fs');
const path = require('path');
const readline = require('readline');

function reply(obj) { process.stdout.write(JSON.stringify(obj) + '\n'); }
function fail(msg) { reply({ error: 'ort worker: ' + msg }); process.exit(1); }

function parseArgs(argv) {
  const a = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || i + 1 >= argv.length) fail('bad argument ' + argv[i] + ' (expected --name value pairs)');
    a[argv[i].slice(2)] = argv[i + 1];
  }
  for (const k of ['ort', 'model', 'inputs', 'threads']) if (!(k in a)) fail('missing --' + k);
  return a;
}

// safetensors: u64 little-endian header length, JSON header, raw little-endian data.
function readSafetensors(file) {
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
  const out = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    if (info.dtype !== 'F32') fail(file + ': tensor ' + name + ' has dtype ' + info.dtype + ', only F32 is supported');
    const [b, e] = info.data_offsets;
    const bytes = buf.subarray(8 + n + b, 8 + n + e);
    const data = new Float32Array(bytes.length / 4);
    Buffer.from(data.buffer).set(bytes);
    out[name] = { dims: info.shape, data };
  }
  return out;
}

function writeSafetensors(file, name, dims, data) {
  const raw = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  let h = JSON.stringify({ [name]: { dtype: 'F32', shape: dims, data_offsets: [0, raw.length] } });
  h += ' '.repeat((8 - (h.length % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(h.length));
  const tmp = file + '.tmp';
  fs.writeFileSync(tmp, Buffer.concat([len, Buffer.from(h, 'utf8'), raw]));
  fs.renameSync(tmp, file);
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  let ort;
  try {
    ort = require(path.join(path.resolve(a.ort), 'node_modules', 'onnxruntime-node'));
  } catch (e) {
    fail('cannot load onnxruntime-node from ' + a.ort + ': ' + e.message);
  }
  const threads = parseInt(a.threads, 10);
  const session = await ort.InferenceSession.create(a.model, {
    intraOpNumThreads: threads, interOpNumThreads: 1, executionMode: 'sequential',
    graphOptimizationLevel: 'all',
  });
  const tensors = readSafetensors(a.inputs);
  const feeds = {};
  for (const name of session.inputNames) {
    if (!(name in tensors)) fail(a.inputs + ' has no tensor ' + name + ' (the model takes ' + session.inputNames.join(', ') + ')');
    feeds[name] = new ort.Tensor('float32', tensors[name].data, tensors[name].dims);
  }
  const outName = session.outputNames[0];
  let last = null;
  const version = require(path.join(path.resolve(a.ort), 'node_modules', 'onnxruntime-node', 'package.json')).version;
  reply({ ready: true, peer: 'onnxruntime', version: 'ONNX Runtime ' + version + ' (onnxruntime-node)', threads });

  const rl = readline.createInterface({ input: process.stdin, terminal: false });
  for await (const line of rl) {
    if (!line.trim()) continue;
    const req = JSON.parse(line);
    if (req.cmd === 'run') {
      const samples = [];
      const c0 = process.cpuUsage();
      for (let i = 0; i < req.iters; ++i) {
        const t0 = process.hrtime.bigint();
        last = (await session.run(feeds))[outName];
        samples.push(Number(process.hrtime.bigint() - t0) / 1e6);
      }
      const c = process.cpuUsage(c0);
      let sum = 0;
      for (const v of last.data) sum += v;
      reply({ samples_ms: samples, cpu_ms: (c.user + c.system) / 1e3, checksum: sum });
    } else if (req.cmd === 'output') {
      if (!last) fail('output requested before any run');
      writeSafetensors(req.path, 'output', last.dims, last.data);
      reply({ ok: true });
    } else if (req.cmd === 'quit') {
      break;
    } else {
      fail('unknown command ' + JSON.stringify(req.cmd) + ' (run, output, quit)');
    }
  }
  process.exit(0);
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));
