import assert from "node:assert/strict";
import { after, test } from "node:test";
import { FailedPreconditionError, InvalidArgumentError } from "../dist/index.js";
import { PRODUCT, processor } from "./helpers.mjs";

const client = processor();
after(() => client.close());

test("a feature runs with wait: its output and each step, and a run lists and reads back", async () => {
  const run = await client.feature.run({ ...PRODUCT, feature: "greet", input: { email: "ada@example.com" }, wait: true });
  assert.equal(run.status, "completed");
  assert.ok(run.ok);
  assert.deepEqual(run.output, { echoed: { received: { email: "ada@example.com" } } });
  assert.deepEqual(
    run.steps.map((step) => [step.sequence, step.event, step.call?.status]),
    [["echo", "echo", "completed"], ["slow", "wait", "skipped"]],
  );
  const got = await client.feature.get({ ...PRODUCT, processId: run.processId });
  assert.equal(got.steps[0].call.attempts, 1);
  assert.ok(got.createdAt instanceof Date && got.endedAt instanceof Date);
  const listed = [];
  for await (const item of client.feature.runs({ ...PRODUCT, feature: "greet", status: "completed" })) listed.push(item.processId);
  assert.ok(listed.includes(run.processId));
});

test("watch follows a run to its end; cancel, resume and replay steer runs", async () => {
  const started = await client.feature.run({ ...PRODUCT, feature: "greet", input: { email: "bo@example.com", slow: true } });
  assert.equal(started.status, "running");
  const seen = [];
  let last;
  for await (const event of client.feature.watch({ ...PRODUCT, processId: started.processId })) {
    if (event.step?.call) seen.push(`${event.step.event}:${event.step.call.status}`);
    last = event;
  }
  assert.equal(last.status, "completed");
  assert.equal(last.run.processId, started.processId);
  assert.ok(seen.includes("wait:completed"), seen.join(","));
  const again = await client.feature.replay({ ...PRODUCT, processId: started.processId, wait: true });
  assert.equal(again.replayOf, started.processId);
  assert.deepEqual(again.input, { email: "bo@example.com", slow: true });
  const slow = await client.feature.run({ ...PRODUCT, feature: "greet", input: { email: "cy@example.com", slow: true } });
  for await (const event of client.feature.watch({ ...PRODUCT, processId: slow.processId })) {
    if (event.step?.event === "wait" && event.step.call?.status === "running") break; // the slow GET is going
  }
  const cancelled = await client.feature.cancel({ ...PRODUCT, processId: slow.processId });
  assert.equal(cancelled.status, "cancelled");
  await assert.rejects(client.feature.cancel({ ...PRODUCT, processId: slow.processId }), FailedPreconditionError);
  const resumed = await client.feature.resume({ ...PRODUCT, processId: slow.processId, wait: true }, { timeoutMs: 20_000 });
  assert.equal(resumed.status, "completed");
});

test("bad input is INVALID_ARGUMENT naming the field", async () => {
  await assert.rejects(client.feature.run({ ...PRODUCT, feature: "greet", input: { email: "nope" } }), (error) => {
    assert.ok(error instanceof InvalidArgumentError);
    assert.equal(error.fieldViolations[0].field, "input.email");
    return true;
  });
});
