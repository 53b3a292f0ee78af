// The Node side of bench/bench_clients.py: one load of the TypeScript client, through its facade or raw @grpc/grpc-js.
//
//   node clients/typescript/bench/load.mjs run --address HOST:PORT --duration S --warmup S --concurrency N --slices N
//   node clients/typescript/bench/load.mjs subscribe --address HOST:PORT --count N --slices N
//   node clients/typescript/bench/load.mjs serve --address HOST:PORT   (a grpc-js ActionService answering one canned reply)
//
// Prints one JSON line: per client, calls (or messages) done in the measured time, its wall and CPU seconds, latencies.
import { parseArgs } from "node:util";
import { Metadata, Server, ServerCredentials, credentials } from "@grpc/grpc-js";
import { Processor } from "../dist/index.js";
import { ActionServiceClient, ActionServiceService } from "../dist/gen/ductape/processor/v1/action.js";
import { BrokerServiceClient } from "../dist/gen/ductape/processor/v1/broker.js";

const { positionals, values } = parseArgs({
  allowPositionals: true,
  options: {
    address: { type: "string" },
    duration: { type: "string", default: "3" },
    warmup: { type: "string", default: "0.5" },
    concurrency: { type: "string", default: "32" },
    slices: { type: "string", default: "12" },
    count: { type: "string", default: "20000" },
    event: { type: "string", default: "events:bench" },
  },
});
const [command] = positionals;
const address = values.address;
const PRODUCT = { product: "bench", env: "dev" };
// The same request both ways: a path parameter and a small JSON body, as plain objects.
const INPUT = { params: { id: "42" }, body: { name: "Ada", tags: ["a", "b"], count: 3 } };

function percentile(sorted, fraction) {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor(fraction * sorted.length))];
}

/** `concurrency` workers calling `call` back to back until `endAt`; calls that finished inside [from, endAt]. */
async function closedLoop(call, fromAt, endAt, concurrency) {
  const latencies = [];
  let errors = 0;
  const worker = async () => {
    for (;;) {
      const began = performance.now();
      if (began >= endAt) return;
      try {
        await call();
      } catch {
        errors++;
        continue;
      }
      const done = performance.now();
      if (began >= fromAt && done <= endAt) latencies.push(done - began);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return { latencies, errors };
}

/** Both clients in one process, in alternating slices (facade, raw, raw, facade, ...): the machine's noise falls on
 * both alike. Each slice: `concurrency` calls in flight for duration / slices seconds. */
async function run() {
  const duration = Number(values.duration);
  const warmup = Number(values.warmup);
  const concurrency = Number(values.concurrency);
  const slices = Number(values.slices);
  const processor = new Processor({ address });
  const request = { ...PRODUCT, app: "api", event: "user", input: INPUT };
  // raw: the generated grpc-js client, a request built as the facade builds it, a deadline, a promise
  const client = new ActionServiceClient(address, credentials.createInsecure());
  const raw = () =>
    new Promise((resolve, reject) => {
      client.run(
        {
          ...PRODUCT,
          app: "api",
          event: "user",
          input: { query: undefined, params: INPUT.params, body: INPUT.body, headers: undefined },
          session: undefined,
          cache: "",
          retries: undefined,
          version: 0,
          idempotencyKey: "",
        },
        new Metadata(),
        { deadline: Date.now() + 30_000 },
        (error, response) => (error ? reject(error) : resolve(response)),
      );
    });
  const calls = { facade: () => processor.action.run(request), raw };
  for (const mode of ["facade", "raw"]) {
    const now = performance.now();
    await closedLoop(calls[mode], now, now + warmup * 1000, concurrency);
  }
  const totals = { facade: { latencies: [], errors: 0, cpu_s: 0, wall_s: 0 }, raw: { latencies: [], errors: 0, cpu_s: 0, wall_s: 0 } };
  const sliceMs = (duration * 1000) / slices;
  for (let i = 0; i < slices; i++) {
    const mode = [0, 3].includes(i % 4) ? "facade" : "raw";
    const cpu = process.cpuUsage();
    const from = performance.now();
    const { latencies, errors } = await closedLoop(calls[mode], from, from + sliceMs, concurrency);
    const used = process.cpuUsage(cpu);
    const total = totals[mode];
    total.latencies.push(...latencies);
    total.errors += errors;
    total.cpu_s += (used.user + used.system) / 1e6;
    total.wall_s += sliceMs / 1000;
  }
  processor.close();
  client.close();
  const result = {};
  for (const [mode, total] of Object.entries(totals)) {
    total.latencies.sort((a, b) => a - b);
    result[mode] = {
      calls: total.latencies.length,
      wall_s: total.wall_s,
      cpu_s: total.cpu_s,
      p50_ms: percentile(total.latencies, 0.5),
      p99_ms: percentile(total.latencies, 0.99),
      errors: total.errors,
    };
  }
  return result;
}

async function publish(processor, count) {
  for (let sent = 0; sent < count; sent += 1000) {
    const n = Math.min(1000, count - sent);
    const messages = Array.from({ length: n }, (_, i) => ({ json: { n: sent + i, user: "u-1" } }));
    const results = await processor.messageBroker.publishBatch({ ...PRODUCT, event: values.event, messages });
    if (!results.every((r) => r.ok)) throw new Error("a publish failed");
  }
}

/** One consumption of `count` fresh messages by `mode`; the stream's closing is not counted. */
async function consume(processor, mode, count) {
  const group = `bench-${mode}-${process.pid}-${Date.now()}`;
  const init = { ...PRODUCT, event: values.event, group, maxInFlight: 1000, maxBatch: 100 };
  const opening = processor.messageBroker.subscribe(init); // creates the group
  await opening.open();
  await opening.close();
  await publish(processor, count);
  let received = 0;
  let sum = 0;
  let last; // the time and CPU when the last message was handled (closing the stream is not counted)
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const done = () => (last = { at: performance.now(), cpu: process.cpuUsage(cpu0) });
  if (mode === "facade") {
    const subscription = processor.messageBroker.subscribe(init);
    for await (const message of subscription) {
      sum += message.json().n;
      message.ack();
      if (++received === count) {
        done();
        break;
      }
    }
  } else {
    // raw: the generated duplex stream (asking for JSON values, as the facade does), acks sent every 100 ids or 10 ms
    const client = new BrokerServiceClient(address, credentials.createInsecure());
    await new Promise((resolve, reject) => {
      const call = client.subscribe(new Metadata());
      let pending = [];
      let timer;
      const flush = () => {
        clearTimeout(timer);
        timer = undefined;
        if (pending.length) call.write({ ack: { ackIds: pending } });
        pending = [];
      };
      call.on("data", (response) => {
        if (!response.batch) return;
        for (const m of response.batch.messages) {
          sum += m.json.n; // the value as published (the stream asks for JSON values, as the facade does)
          pending.push(m.ackId);
          if (pending.length >= 100) flush();
          else timer ??= setTimeout(flush, 10);
          if (++received === count) {
            flush();
            done();
            call.end();
            resolve();
          }
        }
      });
      call.on("error", (error) => (received === count ? resolve() : reject(error)));
      call.write({
        init: {
          ...init,
          maxWait: undefined,
          ackDeadline: undefined,
          maxDeliveries: 0,
          deadLetterEvent: "",
          jsonValues: true,
        },
      });
    });
    client.close();
  }
  const expected = (count * (count - 1)) / 2;
  if (sum !== expected) throw new Error(`payloads do not add up: ${sum} != ${expected}`);
  return { messages: received, wall_s: (last.at - t0) / 1000, cpu_s: (last.cpu.user + last.cpu.system) / 1e6 };
}

/** Both clients in one process, `--slices` consumptions in all, in the order facade, raw, raw, facade, ...: totals
 * per client, and each consumption in order (`slices`), so that neighbours can be paired. */
async function subscribe() {
  const processor = new Processor({ address });
  const count = Number(values.count);
  for (const mode of ["facade", "raw", "facade", "raw"]) await consume(processor, mode, 5000); // warm-up (the JIT)
  const totals = { facade: { messages: 0, wall_s: 0, cpu_s: 0 }, raw: { messages: 0, wall_s: 0, cpu_s: 0 } };
  const slices = [];
  for (let i = 0; i < Number(values.slices); i++) {
    const mode = [0, 3].includes(i % 4) ? "facade" : "raw";
    const one = await consume(processor, mode, count);
    for (const key of Object.keys(one)) totals[mode][key] += one[key];
    slices.push({ mode, ...one });
  }
  processor.close();
  return { ...totals, slices };
}

async function serve() {
  // What the processor answers for the bench action, canned: the client's work is the same, the server's is none.
  const reply = {
    statusCode: 200,
    headers: { "content-type": "application/json; charset=utf-8" },
    json: { ok: true, id: 1 },
    raw: undefined,
    contentType: "application/json",
    processId: "01a23c3167732080f33200000d",
    attempts: 1,
    cached: false,
    version: 1,
  };
  const server = new Server();
  server.addService(ActionServiceService, { run: (_call, callback) => callback(null, reply) });
  await new Promise((resolve, reject) =>
    server.bindAsync(address, ServerCredentials.createInsecure(), (error) => (error ? reject(error) : resolve())),
  );
  console.log(JSON.stringify({ serving: address }));
  await new Promise((resolve) => process.on("SIGTERM", resolve));
  server.forceShutdown();
  process.exit(0);
}

if (command === "serve") await serve();
const result = command === "run" ? await run() : command === "subscribe" ? await subscribe() : undefined;
if (result === undefined) throw new Error(`unknown command ${command}`);
console.log(JSON.stringify(result));
