// check.mjs - llama.cpp (through node-llama-cpp's prebuilt binaries) runs the GGUF files that
// moe.h wrote, and must agree with moe.h (make interop).
//
//   node tests/interop/check.mjs <dir with expected.json and the .gguf files> <node-llama-cpp's npm prefix>
//
// expected.json (test_interchange --interop) holds, per model and prompt: the prompt's byte
// tokens, moe.h's next-token logits at the last prompt position, its greedy continuation with
// the margin of each choice over the runner-up, and its generation speed.
// Checks, per case and file type (F32, and F16 weights):
//   - the vocabulary: llama.cpp tokenizes the prompt text to its bytes and back;
//   - next-token logits (controlledEvaluate's raw logits, KV cache in F32): |llama - ours| <=
//     1e-4 + 1e-4 |ours| for F32 weights (measured: <= 4e-6); for F16 weights (llama.cpp also
//     rounds the activations to F16 for those products; ours are the F32 model's logits)
//     0.05 + 0.02 |ours| (measured: <= 6e-3); and the same argmax;
//   - the greedy continuation (llama.cpp's sampler at temperature 0) equals ours token for
//     token; a first difference at a step where our margin is below 1e-3 (F16: 0.05) is a
//     near-tie and ends the comparison without failing.
// Prints one line per check, a bench line per model (tokens/s of the greedy continuation,
// prompt included, batch 1, the same thread count as ours: expected.json's, or
// INTEROP_THREADS; median over the prompts), and "N passed, N failed"; exits 1 on a failure.
// The llama.cpp side is timed through node-llama-cpp's evaluate() loop, so it includes the
// binding's per-token JavaScript and sampler work, which dominates for models this small;
// ours is moe_model_generate_batch with one sequence and greedy sampling: the prompt in one
// decode call, then one token at a time on a KV cache, as llama.cpp decodes.
import fs from "node:fs";
import path from "node:path";
import {pathToFileURL} from "node:url";

const [dir, prefix] = process.argv.slice(2);
if (!dir || !prefix) {
    console.error("usage: node check.mjs DIR NPM_PREFIX");
    process.exit(2);
}
const {getLlama, LlamaLogLevel} = await import(pathToFileURL(path.join(prefix, "node_modules", "node-llama-cpp", "dist", "index.js")).href);
const expected = JSON.parse(fs.readFileSync(path.join(dir, "expected.json"), "utf8"));
const threads = Number(process.env.INTEROP_THREADS || expected.threads);

let passed = 0, failed = 0;
function check(ok, what) {
    if (ok) passed++;
    else failed++;
    console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
}

const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error, maxThreads: threads});
const bench = {};

for (const [suffix, atol, rtol, tie] of [["", 1e-4, 1e-4, 1e-3], ["_f16", 0.05, 0.02, 0.05]]) {
    for (const modelName of [...new Set(expected.cases.map((c) => c.model))]) {
        const file = `${modelName}${suffix}.gguf`;
        let model;
        try {
            model = await llama.loadModel({modelPath: path.join(dir, file), gpuLayers: 0});
        } catch (e) {
            check(false, `${file}: llama.cpp loads it (${e.message})`);
            continue;
        }
        check(true, `${file}: llama.cpp loads it`);
        // the KV cache in F32 (llama.cpp's default is F16, which alone moves logits by ~5e-3)
        const context = await model.createContext({contextSize: 64, batchSize: 64, threads, sequences: 1, flashAttention: false,
                                                   experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32"});
        const sequence = context.getSequence();
        for (const c of expected.cases.filter((x) => x.model === modelName)) {
            const text = Buffer.from(c.prompt).toString("latin1");
            const label = `${file} "${text.length > 24 ? text.slice(0, 24) + "..." : text}"`;
            if (suffix === "" && c.prompt.every((b) => b < 128)) {
                const tok = model.tokenize(text, false);
                const back = model.detokenize(tok);
                check(tok.length === c.prompt.length && tok.every((t, i) => t === c.prompt[i]) && back === text,
                      `${label}: the byte vocabulary tokenizes to the bytes and back`);
            }
            // next-token logits at the last prompt position
            await sequence.clearHistory();
            const input = c.prompt.map((t, i) => (i === c.prompt.length - 1 ? [t, {generateNext: {logits: true}}] : t));
            const res = await sequence.controlledEvaluate(input);
            const logits = res[c.prompt.length - 1]?.next?.logits;
            if (!logits || logits.size !== 256) {
                check(false, `${label}: llama.cpp returned ${logits ? logits.size : "no"} logits`);
                continue;
            }
            let worst = 0, worstExcess = -Infinity, argL = 0, argO = 0;
            for (let t = 0; t < 256; t++) {
                const l = logits.get(t), o = c.logits[t];
                const d = Math.abs(l - o);
                worst = Math.max(worst, d);
                worstExcess = Math.max(worstExcess, d - (atol + rtol * Math.abs(o)));
                if (l > logits.get(argL)) argL = t;
                if (o > c.logits[argO]) argO = t;
            }
            check(worstExcess <= 0 && argL === argO, `${label}: next-token logits, max |diff| ${worst.toExponential(2)}, argmax ${argL} vs ours ${argO}`);
            // greedy continuation
            await sequence.clearHistory();
            const got = [];
            const t0 = performance.now();
            for await (const t of sequence.evaluate(c.prompt, {temperature: 0})) {
                got.push(t);
                if (got.length === c.greedy.length) break;
            }
            const secs = (performance.now() - t0) / 1000;
            let k = 0;
            while (k < got.length && got[k] === c.greedy[k]) k++;
            const nearTie = k < c.greedy.length && c.margins[k] < tie;
            check(k === c.greedy.length || nearTie,
                  `${label}: greedy continuation, ${k} of ${c.greedy.length} tokens equal` +
                      (k < c.greedy.length ? ` (ours ${c.greedy[k]}, llama.cpp ${got[k]}, our margin ${c.margins[k]}${nearTie ? ": a near-tie" : ""})` : ""));
            if (suffix === "") {
                const b = (bench[modelName] ??= {ours: [], llama: []});
                b.ours.push(c.ours_tokens_per_s);
                b.llama.push(got.length / secs);
            }
        }
        await context.dispose();
        await model.dispose();
    }
}
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
for (const [name, b] of Object.entries(bench))
    console.log(`bench model=${name} threads=${threads} batch=1 ours_tokens_per_s=${median(b.ours).toFixed(1)} node_llama_cpp_tokens_per_s=${median(b.llama).toFixed(1)}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
