// Retries on UNAVAILABLE, against grpc-js servers that fail on purpose: only calls safe to repeat are repeated.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Server, ServerCredentials, status } from "@grpc/grpc-js";
import { ActionServiceService } from "../dist/gen/ductape/processor/v1/action.js";
import { ProductServiceService } from "../dist/gen/ductape/processor/v1/product.js";
import { Processor } from "../dist/index.js";

const calls = { get: 0, run: 0 };
let failures = { get: 0, run: 0, runCode: status.UNAVAILABLE };
let server;
let client;

before(async () => {
  server = new Server();
  server.addService(ProductServiceService, {
    get: (_call, callback) => {
      calls.get++;
      if (failures.get-- > 0) return callback({ code: status.UNAVAILABLE, details: "restarting" });
      callback(null, { version: { product: "p", version: 1, checksum: "", createTime: undefined, pinnedEnvs: [] }, manifest: Buffer.alloc(0), format: 0, pins: {} });
    },
  });
  server.addService(ActionServiceService, {
    run: (_call, callback) => {
      calls.run++;
      callback({ code: failures.runCode, details: "no" });
    },
  });
  const port = await new Promise((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (error, port) => (error ? reject(error) : resolve(port))),
  );
  client = new Processor({ address: `127.0.0.1:${port}`, timeoutMs: 5000 });
});

after(() => {
  client.close();
  server.forceShutdown();
});

test("a read is retried on UNAVAILABLE, with backoff, and succeeds", async () => {
  calls.get = 0;
  failures.get = 2;
  const got = await client.product.get("p");
  assert.equal(got.version.version, 1);
  assert.equal(calls.get, 3);
});

test("a read gives up after the retries with the last error", async () => {
  calls.get = 0;
  failures.get = 10;
  await assert.rejects(client.product.get("p"), { name: "UnavailableError" });
  assert.equal(calls.get, 4); // once, then 3 retries
  failures.get = 0;
});

test("an action run is not repeated, unless it carries an idempotency key", async () => {
  calls.run = 0;
  await assert.rejects(client.action.run({ product: "p", env: "e", app: "a", event: "x" }), { name: "UnavailableError" });
  assert.equal(calls.run, 1);
  calls.run = 0;
  await assert.rejects(client.action.run({ product: "p", env: "e", app: "a", event: "x", idempotencyKey: "k" }), { name: "UnavailableError" });
  assert.equal(calls.run, 4);
});

test("other codes are not retried; retries: 0 turns retrying off", async () => {
  calls.run = 0;
  failures.runCode = status.RESOURCE_EXHAUSTED;
  await assert.rejects(client.action.run({ product: "p", env: "e", app: "a", event: "x", idempotencyKey: "k" }), { name: "ResourceExhaustedError" });
  assert.equal(calls.run, 1);
  failures.runCode = status.UNAVAILABLE;
  const once = new Processor({ address: client.channel.getTarget().replace(/^dns:/, ""), retries: 0 });
  try {
    calls.get = 0;
    failures.get = 1;
    await assert.rejects(once.product.get("p"), { name: "UnavailableError" });
    assert.equal(calls.get, 1);
  } finally {
    once.close();
    failures.get = 0;
  }
});
