import assert from "node:assert/strict";
import { after, test } from "node:test";
import { InvalidArgumentError } from "../dist/index.js";
import { PRODUCT, processor, take, unique, until } from "./helpers.mjs";

const client = processor();
after(() => client.close());

test("a publish job runs now: the subscriber gets its message, watchRuns and listRuns see the run", async () => {
  const group = unique("jobs");
  const subscription = client.messageBroker.subscribe({ ...PRODUCT, event: "events:jobs", group });
  await subscription.open();
  const watched = [];
  const watching = (async () => {
    for await (const run of client.job.watchRuns(PRODUCT)) {
      watched.push(run);
      if (run.status === "succeeded") return;
    }
  })();
  await new Promise((resolve) => setTimeout(resolve, 300)); // the watch stream is open
  const tick = unique("tick");
  const scheduled = await client.job.schedule({ ...PRODUCT, kind: "publish", event: "events:jobs", input: { message: { tick } } });
  assert.match(scheduled.jobId, /.+/);
  assert.equal(scheduled.status, "scheduled");
  const [message] = await take(subscription[Symbol.asyncIterator](), 1, 15_000);
  assert.deepEqual(message.json(), { tick });
  message.ack();
  await subscription.close();
  await watching;
  assert.ok(watched.some((run) => run.jobId === scheduled.jobId && run.status === "succeeded"));
  const page = await until(async () => {
    const listed = await client.job.listRuns({ ...PRODUCT, jobId: scheduled.jobId, status: "succeeded" });
    return listed.runs.length ? listed : undefined;
  }, "the run to be listed");
  assert.equal(page.runs[0].trigger, "schedule");
  assert.ok(page.runs[0].dueAt instanceof Date);
  const job = await client.job.get({ ...PRODUCT, jobId: scheduled.jobId });
  assert.equal(job.kind, "publish");
  assert.equal(job.event, "events:jobs");
  assert.deepEqual(job.input, { message: { tick } });
});

test("a repeating job by name: pause, resume, triggerNow, cancel; list finds it", async () => {
  const name = unique("nightly");
  await client.job.schedule({
    ...PRODUCT,
    kind: "publish",
    event: "events:jobs",
    input: { message: { nightly: true } },
    repeat: { cron: "30 1 * * *", timezone: "Europe/London" },
    retries: { maxRetries: 2, initialDelayMs: 1000 },
    overlap: "skip",
    name,
  });
  const job = await client.job.get({ ...PRODUCT, name });
  assert.equal(job.status, "scheduled");
  assert.ok(job.nextRunAt instanceof Date && job.nextRunAt > new Date());
  assert.equal(job.raw.repeat.cron, "30 1 * * *");
  assert.equal((await client.job.pause({ ...PRODUCT, name })).status, "paused");
  assert.equal((await client.job.resume({ ...PRODUCT, name })).status, "scheduled");
  const manual = await client.job.triggerNow({ ...PRODUCT, name });
  assert.equal(manual.trigger, "manual");
  const listed = await client.job.list({ ...PRODUCT, name });
  assert.deepEqual(listed.jobs.map((j) => j.name), [name]);
  assert.equal((await client.job.cancel({ ...PRODUCT, name })).status, "cancelled");
  const runs = [];
  for await (const run of client.job.runs({ ...PRODUCT, jobId: job.jobId })) runs.push(run);
  assert.ok(runs.some((run) => run.runId === manual.runId));
});

test("a bad cron expression is INVALID_ARGUMENT naming the field", async () => {
  await assert.rejects(
    client.job.schedule({ ...PRODUCT, kind: "publish", event: "events:jobs", input: { message: 1 }, repeat: { cron: "nope" } }),
    (error) => {
      assert.ok(error instanceof InvalidArgumentError);
      assert.ok(error.fieldViolations.some((v) => v.field.includes("cron")), JSON.stringify(error.fieldViolations));
      return true;
    },
  );
});
