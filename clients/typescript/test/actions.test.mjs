import assert from "node:assert/strict";
import { after, test } from "node:test";
import { ADDRESS, PRODUCT, processor, unique } from "./helpers.mjs";
import { Processor } from "../dist/index.js";

const client = processor();
after(() => client.close());

const profile = { name: "Ada", tags: ["math", "engines"], age: 36, admin: true, ratio: 0.5, nothing: null, nested: { deep: [1, { x: "y" }] } };

test("action.run takes plain objects: the upstream receives them as sent", async () => {
  const result = await client.action.run({
    ...PRODUCT,
    app: "echo",
    event: "echo",
    input: { body: { email: "ada@example.com", profile } },
  });
  assert.equal(result.statusCode, 200);
  assert.equal(result.ok, true);
  assert.equal(result.contentType, "application/json");
  assert.deepEqual(result.body, { received: { email: "ada@example.com", profile } });
  assert.match(result.processId, /.+/);
  assert.equal(result.attempts, 1);
  assert.equal(result.version, 1);
});

test("the execution log lists the run with Dates", async () => {
  const run = await client.action.run({ ...PRODUCT, app: "echo", event: "echo", input: { body: { email: "log@example.com" } } });
  let found;
  for (let i = 0; i < 50 && !found; i++) {
    const page = await client.log.listExecutions({ product: "tsclient", resource: "echo:echo", status: "success" });
    found = page.executions.find((e) => e.processId === run.processId);
    if (!found) await new Promise((r) => setTimeout(r, 100));
  }
  assert.ok(found, "the execution was not listed");
  assert.ok(found.startTime instanceof Date);
  assert.equal(found.upstreamStatus, 200);
});

test("product.get, listVersions, versions and validate", async () => {
  const got = await client.product.get("tsclient", { env: "dev" });
  assert.equal(got.version.product, "tsclient");
  assert.equal(got.version.version, 1);
  assert.ok(got.version.createTime instanceof Date);
  assert.ok(JSON.parse(got.manifest.toString()).apps.length >= 1);
  const versions = [];
  for await (const version of client.product.versions("tsclient", { pageSize: 1 })) versions.push(version.version);
  assert.deepEqual(versions, [1]);
  const checked = await client.product.validate(Buffer.from('{"product": "x", "environments": []}'));
  assert.equal(checked.valid, false);
  assert.ok(checked.problems.length > 0);
});

test("deadlines apply by default and per call", async () => {
  const quick = new Processor({ address: ADDRESS, timeoutMs: 300 });
  try {
    await assert.rejects(quick.action.run({ ...PRODUCT, app: "echo", event: "slow" }), (error) => {
      assert.equal(error.name, "DeadlineExceededError");
      assert.equal(error.codeName, "DEADLINE_EXCEEDED");
      return true;
    });
  } finally {
    quick.close();
  }
  await assert.rejects(client.action.run({ ...PRODUCT, app: "echo", event: "slow" }, { timeoutMs: 200 }), {
    name: "DeadlineExceededError",
  });
});

test("per-call metadata: the caller's x-request-id comes back on the error", async () => {
  const requestId = unique("req");
  await assert.rejects(client.product.get("no-such-product", {}, { metadata: { "X-Request-Id": requestId } }), (error) => {
    assert.equal(error.requestId, requestId);
    return true;
  });
});

test("an AbortSignal cancels a call", async () => {
  const controller = new AbortController();
  const running = client.action.run({ ...PRODUCT, app: "echo", event: "slow" }, { signal: controller.signal });
  setTimeout(() => controller.abort(), 100);
  await assert.rejects(running, { name: "CancelledError" });
});
