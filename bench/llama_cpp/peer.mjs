// llama.cpp peer of devpipe bench's `llm` workload, through node-llama-cpp 3.21.1 (prebuilt
// linux-x64 binaries, cpu only). Token ids go in directly: no tokenizer, no text round-trip.
//
//   node bench/llama_cpp/peer.mjs generate --model M.gguf --prompts "1,17,42;5,6" --max-new-tokens 32
//       greedy generation (temperature 0: argmax); each prompt in its own context sequence, all
//       sequences stepped together. Prints {"generated": [[ids], ...], ...}. Does not stop at eos.
//   node bench/llama_cpp/peer.mjs bench --model M.gguf --prompts "ids;ids;..." [--decode-tokens 64]
//       [--batches 1,8] [--iters 3] [--warmup 1]
//       prefill: one sequence evaluates prompt 0 (one llama_decode, batch size >= prompt, no
//       sampling); decode at batch B: B sequences with prompts 0..B-1 (prefilled untimed), then
//       --decode-tokens greedy steps in which all B sequences' tokens are
//       queued together, so node-llama-cpp evaluates them in one llama_decode batch per step.
//       Prints {"prefill_ms": [...], "prefill_tokens_per_s", "decode": {"1": {"step_ms": [...],
//       "tokens_per_s", "generated_seq0"}, "8": ...}, ...}; tokens_per_s from the median sample.
//   node bench/llama_cpp/peer.mjs serve --model M.gguf --prompts "ids;ids;..." [--decode-tokens 32]
//       [--batches 1,8]
//       a persistent worker of `devpipe bench --workload llm` (bench/README.md): prints
//       {"ready": true, "peer", "version", "threads", ...}, then one JSON reply per request line:
//       {"cmd": "prefill", "iters": N} -> {"samples_ms", "cpu_ms", "tokens": [[next greedy id]]}
//       (the prefill as in bench, then one greedy step on it, untimed, for the check);
//       {"cmd": "decode", "batch": B, "iters": N} -> {"samples_ms" (every step of the N runs),
//       "cpu_ms", "tokens": [[ids of sequence b] for b < B] (the last run)}; {"cmd": "quit"}.
//       Errors are answered {"error": ...} and the process exits 2.
//   Common: [--threads N] (default: all cores) [--kv-type F32|F16] (default F32: float32 cache)
//       [--llama-cpp-dir DIR] (where install.sh put node_modules; default DEVPIPE_LLAMA_CPP_DIR
//       or build/llama_cpp)
//
// Run with the packages install.sh put in build/llama_cpp (or DEVPIPE_LLAMA_CPP_DIR): the script
// resolves node-llama-cpp from there.
import os from "node:os";
import path from "node:path";
import {createRequire} from "node:module";
import {pathToFileURL, fileURLToPath} from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
let serving = false;

function fail(msg) {
  process.stderr.write(`peer.mjs: ${msg}\n`);
  if (serving) process.stdout.write(JSON.stringify({error: `peer.mjs: ${msg}`.slice(0, 4000)}) + "\n");
  process.exit(2);
}

function parseArgs(argv) {
  const cmd = argv[0];
  const a = {};
  for (let i = 1; i < argv.length; i++) {
    const k = argv[i];
    if (!k.startsWith("--")) fail(`unexpected argument ${JSON.stringify(k)}`);
    if (i + 1 >= argv.length) fail(`${k} needs a value`);
    a[k.slice(2)] = argv[++i];
  }
  return [cmd, a];
}

function intArg(a, k, def) {
  if (a[k] === undefined) {
    if (def === undefined) fail(`--${k} is required`);
    return def;
  }
  const v = Number(a[k]);
  if (!Number.isInteger(v)) fail(`--${k} must be an integer, got ${JSON.stringify(a[k])}`);
  return v;
}

function parsePrompts(s) {
  return s.split(";").map((p, i) => {
    const ids = p.split(",").map((x) => Number(x.trim()));
    if (!p.trim() || ids.some((x) => !Number.isInteger(x) || x < 0)) {
      fail(`--prompts: sequence ${i} (${JSON.stringify(p)}) is not comma-separated token ids`);
    }
    return ids;
  });
}

function median(xs) {
  const s = [...xs].sort((x, y) => x - y);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

// Splits ids into the evaluated prefix and a last token that asks for a greedy next token.
function withGreedyLast(ids) {
  const items = ids.slice(0, -1);
  items.push([ids[ids.length - 1], {generateNext: {token: true, options: {temperature: 0}}}]);
  return items;
}

async function greedyNext(seq, ids) {
  const res = await seq.controlledEvaluate(withGreedyLast(ids));
  const t = res[ids.length - 1]?.next?.token;
  if (t === undefined || t === null) fail("controlledEvaluate returned no next token");
  return t;
}

// One generation over a set of sequences: prompts[i] on seqs[i]; returns ids and per-step times.
async function generate(seqs, prompts, maxNew) {
  const t0 = performance.now();
  let cur = await Promise.all(seqs.map((s, i) => greedyNext(s, prompts[i])));
  const prefillMs = performance.now() - t0;
  const out = cur.map((t) => [t]);
  const stepMs = [];
  let stepCpuMs = 0;
  for (let step = 1; step < maxNew; step++) {
    const c0 = process.cpuUsage();
    const ts = performance.now();
    cur = await Promise.all(seqs.map((s, i) => greedyNext(s, [cur[i]])));
    stepMs.push(performance.now() - ts);
    stepCpuMs += cpuMs(c0);
    cur.forEach((t, i) => out[i].push(t));
  }
  return {out, prefillMs, stepMs, stepCpuMs};
}

async function main() {
  const [cmd, a] = parseArgs(process.argv.slice(2));
  serving = cmd === "serve";
  if (cmd !== "generate" && cmd !== "bench" && cmd !== "serve") {
    fail(`first argument must be generate, bench or serve, got ${JSON.stringify(cmd)}`);
  }
  const pkgDir = path.resolve(a["llama-cpp-dir"] || process.env.DEVPIPE_LLAMA_CPP_DIR ||
                              path.join(here, "..", "..", "build", "llama_cpp"));
  if (!a.model) fail("--model is required");
  const threads = intArg(a, "threads", os.cpus().length);
  const kvType = a["kv-type"] || "F32";
  if (kvType !== "F32" && kvType !== "F16") fail(`--kv-type must be F32 or F16, got ${kvType}`);

  const require = createRequire(path.join(pkgDir, "package.json"));
  let entry;
  try {
    entry = require.resolve("node-llama-cpp");
  } catch {
    fail(`node-llama-cpp not found under ${pkgDir}: run bash bench/llama_cpp/install.sh`);
  }
  const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);
  const llama = await getLlama({gpu: false, build: "never", usePrebuiltBinaries: true, skipDownload: true,
                                maxThreads: threads, logLevel: LlamaLogLevel.error, progressLogs: false});
  const model = await llama.loadModel({modelPath: a.model, gpuLayers: 0});

  const common = {threads: {ideal: threads, min: threads}, experimentalKvCacheKeyType: kvType,
                  experimentalKvCacheValueType: kvType, flashAttention: false};
  const info = {peer: "llama.cpp", node_llama_cpp: "3.21.1", threads, kv_cache_type: kvType,
                cpu: os.cpus()[0]?.model, gpu: llama.gpu};

  if (cmd === "generate") {
    const prompts = parsePrompts(a.prompts || fail("--prompts is required"));
    const maxNew = intArg(a, "max-new-tokens");
    const longest = Math.max(...prompts.map((p) => p.length));
    const ctx = await model.createContext({...common, sequences: prompts.length, contextSize: longest + maxNew + 8,
                                           batchSize: Math.max(512, longest * prompts.length)});
    const seqs = prompts.map(() => ctx.getSequence());
    const r = await generate(seqs, prompts, maxNew);
    console.log(JSON.stringify({...info, generated: r.out}));
    await ctx.dispose();
  } else if (cmd === "serve") {
    await serve(model, common, info, a);
  } else {
    const prompts = parsePrompts(a.prompts || fail("--prompts is required"));
    const promptLen = prompts[0].length;
    const decodeTokens = intArg(a, "decode-tokens", 64);
    const iters = intArg(a, "iters", 3);
    const warmup = intArg(a, "warmup", 1);
    const batches = (a.batches || "1,8").split(",").map(Number);
    if (batches.some((b) => !Number.isInteger(b) || b < 1 || b > prompts.length)) {
      fail(`--batches ${a.batches}: each must be an integer in [1, ${prompts.length}] (the number of --prompts)`);
    }
    if (decodeTokens < 2 || iters < 1 || warmup < 0) fail("--decode-tokens >= 2, --iters >= 1, --warmup >= 0");
    const maxB = Math.max(...batches);
    const longest = Math.max(...prompts.map((p) => p.length));
    const ctx = await model.createContext({...common, sequences: maxB, contextSize: longest + decodeTokens + 8,
                                           batchSize: Math.max(512, longest * maxB)});
    const seqs = Array.from({length: maxB}, () => ctx.getSequence());
    const result = {...info, prompt_len: promptLen, decode_tokens: decodeTokens, iters, warmup,
                    prefill_ms: [], decode: {}};
    // prefill at batch 1: the whole prompt in one evaluation (no sampling)
    for (let it = 0; it < warmup + iters; it++) {
      await seqs[0].clearHistory();
      const ids = prompts[0];
      const t0 = performance.now();
      await seqs[0].evaluateWithoutGeneratingNewTokens(ids);
      const ms = performance.now() - t0;
      if (it >= warmup) result.prefill_ms.push(ms);
    }
    result.prefill_tokens_per_s = promptLen / (median(result.prefill_ms) / 1e3);
    for (const b of batches) {
      const steps = [];
      let generated = null;
      for (let it = 0; it < warmup + iters; it++) {
        const use = seqs.slice(0, b);
        await Promise.all(use.map((s) => s.clearHistory()));
        const r = await generate(use, prompts.slice(0, b), decodeTokens);
        if (it >= warmup) steps.push(...r.stepMs);
        generated = r.out[0];
      }
      result.decode[String(b)] = {step_ms: steps, step_ms_median: median(steps),
                                  tokens_per_s: b / (median(steps) / 1e3), generated_seq0: generated};
    }
    console.log(JSON.stringify(result));
    await ctx.dispose();
  }
  await model.dispose();
  await llama.dispose();
}

function cpuMs(from) {
  const u = process.cpuUsage(from);
  return (u.user + u.system) / 1e3;
}

async function serve(model, common, info, a) {
  const prompts = parsePrompts(a.prompts || fail("--prompts is required"));
  const decodeTokens = intArg(a, "decode-tokens", 32);
  const batches = (a.batches || "1,8").split(",").map(Number);
  if (batches.some((b) => !Number.isInteger(b) || b < 1 || b > prompts.length)) {
    fail(`--batches ${a.batches}: each must be an integer in [1, ${prompts.length}] (the number of --prompts)`);
  }
  if (decodeTokens < 2) fail(`--decode-tokens must be >= 2, got ${decodeTokens}`);
  const maxB = Math.max(...batches);
  const longest = Math.max(...prompts.map((p) => p.length));
  const ctx = await model.createContext({...common, sequences: maxB, contextSize: longest + decodeTokens + 8,
                                         batchSize: Math.max(512, longest * maxB)});
  const seqs = Array.from({length: maxB}, () => ctx.getSequence());
  process.stdout.write(JSON.stringify({ready: true, ...info, version: `node-llama-cpp ${info.node_llama_cpp}`}) + "\n");
  const {createInterface} = await import("node:readline");
  for await (const line of createInterface({input: process.stdin, crlfDelay: Infinity})) {
    if (!line.trim()) continue;
    let req;
    try {
      req = JSON.parse(line);
    } catch {
      fail(`request is not JSON: ${JSON.stringify(line.slice(0, 200))}`);
    }
    const iters = Number(req.iters);
    if (req.cmd === "quit") break;
    if (req.cmd !== "prefill" && req.cmd !== "decode") fail(`unknown command ${JSON.stringify(req.cmd)} (prefill, decode, quit)`);
    if (!Number.isInteger(iters) || iters < 1) fail(`${req.cmd}: iters must be an integer >= 1, got ${JSON.stringify(req.iters)}`);
    const samples = [];
    let cpu = 0;
    let tokens = null;
    if (req.cmd === "prefill") {
      for (let it = 0; it < iters; it++) {
        await seqs[0].clearHistory();
        const c0 = process.cpuUsage();
        const t0 = performance.now();
        await seqs[0].evaluateWithoutGeneratingNewTokens(prompts[0]);
        samples.push(performance.now() - t0);
        cpu += cpuMs(c0);
      }
      // the check: the greedy id after the prompt, from a fresh evaluation (untimed)
      await seqs[0].clearHistory();
      tokens = [[await greedyNext(seqs[0], prompts[0])]];
    } else {
      const b = Number(req.batch);
      if (!batches.includes(b)) fail(`decode batch ${JSON.stringify(req.batch)} is not among --batches ${batches}`);
      const use = seqs.slice(0, b);
      for (let it = 0; it < iters; it++) {
        await Promise.all(use.map((s) => s.clearHistory()));
        const r = await generate(use, prompts.slice(0, b), decodeTokens);
        samples.push(...r.stepMs);
        cpu += r.stepCpuMs;
        tokens = r.out;
      }
    }
    process.stdout.write(JSON.stringify({samples_ms: samples, cpu_ms: cpu, tokens}) + "\n");
  }
  await ctx.dispose();
}

main().catch((e) => fail(e?.stack || String(e)));
