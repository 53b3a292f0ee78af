import assert from "node:assert/strict";
import { after, test } from "node:test";
import { Processor } from "../dist/index.js";
import { PRODUCT, processor, proxy, take, unique } from "./helpers.mjs";

const client = processor();
after(() => client.close());

test("publish JSON and bytes, subscribe, ack: acked messages are not delivered again", async () => {
  const group = unique("acked");
  const event = "events:acked";
  const subscription = client.messageBroker.subscribe({ ...PRODUCT, event, group, maxBatch: 10 });
  await subscription.open(); // the group exists from here on
  assert.match(subscription.subscriptionId, /.+/);
  const ids = [];
  for (let i = 0; i < 25; i++) {
    ids.push(await client.messageBroker.publish({ ...PRODUCT, event, json: { n: i, nested: { ok: true } }, attributes: { i: String(i) } }));
  }
  const raw = await client.messageBroker.publish({ ...PRODUCT, event, data: Buffer.from("raw bytes"), contentType: "text/plain" });
  const iterator = subscription[Symbol.asyncIterator]();
  const messages = await take(iterator, 26);
  assert.deepEqual(messages.map((m) => m.id), [...ids, raw]);
  messages.slice(0, 25).forEach((m, i) => {
    assert.equal(m.publishedAsJson, true); // came as the value it was published as: nothing parsed
    assert.deepEqual(m.json(), { n: i, nested: { ok: true } });
    assert.deepEqual(JSON.parse(m.data.toString("utf8")), { n: i, nested: { ok: true } });
    assert.equal(m.contentType, "application/json");
    assert.equal(m.attributes.i, String(i));
    assert.equal(m.deliveryAttempt, 1);
    assert.ok(m.publishTime instanceof Date);
    assert.equal(m.type, "acked");
  });
  assert.equal(messages[25].publishedAsJson, false);
  assert.equal(messages[25].text(), "raw bytes");
  assert.equal(messages[25].contentType, "text/plain");
  for (const message of messages) message.ack();
  await subscription.close();

  // a new stream of the same group gets the next message and none of the acked ones
  const again = client.messageBroker.subscribe({ ...PRODUCT, event, group });
  await again.open();
  const marker = await client.messageBroker.publish({ ...PRODUCT, event, json: "marker" });
  const [next] = await take(again[Symbol.asyncIterator](), 1);
  assert.equal(next.id, marker);
  next.ack();
  await again.close();
});

test("JSON payloads arrive as the values they were published as, or as bytes when the stream asks", async () => {
  const event = "events:acked";
  const values = client.messageBroker.subscribe({ ...PRODUCT, event, group: unique("values") });
  const bytes = client.messageBroker.subscribe({ ...PRODUCT, event, group: unique("bytes"), jsonValues: false });
  try {
    await Promise.all([values.open(), bytes.open()]);
    const published = [{ big: 2 ** 40, list: [1, "two", null], empty: {} }, null, {}, [], "text", 1.5];
    for (const json of published) await client.messageBroker.publish({ ...PRODUCT, event, json });
    const data = Buffer.from('{"as": "bytes"}');
    await client.messageBroker.publish({ ...PRODUCT, event, data, contentType: "application/json" });
    const asValues = await take(values[Symbol.asyncIterator](), published.length + 1);
    const asBytes = await take(bytes[Symbol.asyncIterator](), published.length + 1);
    assert.deepEqual(asValues.map((m) => m.publishedAsJson), [...published.map(() => true), false]);
    assert.deepEqual(asValues.map((m) => m.json()), [...published, { as: "bytes" }]);
    assert.deepEqual(asBytes.map((m) => m.publishedAsJson), [...published.map(() => false), false]);
    assert.deepEqual(asBytes.map((m) => m.json()), [...published, { as: "bytes" }]);
    assert.deepEqual(JSON.parse(asBytes[0].text()), published[0]); // compact UTF-8 JSON, keys in any order
    assert.deepEqual(asValues[published.length].data, data); // bytes stay the bytes published
    for (const m of [...asValues, ...asBytes]) m.ack();
  } finally {
    await Promise.all([values.close(), bytes.close()]);
  }
});

test("publishBatch: one result per entry, a bad entry does not stop the others", async () => {
  const results = await client.messageBroker.publishBatch({
    ...PRODUCT,
    event: "events:acked",
    messages: [{ json: { a: 1 } }, { json: 1, attributes: { "bad key": "x" } }, { data: Buffer.from("x") }],
  });
  assert.deepEqual(results.map((r) => r.ok), [true, false, true]);
  assert.equal(results[1].reason, "INVALID_ARGUMENT");
  assert.match(results[1].message, /messages\[1\]/);
});

test("nack: the message comes back with the next delivery attempt; stale acks are counted", async () => {
  const group = unique("nacked");
  const event = "events:nacked";
  const subscription = client.messageBroker.subscribe({ ...PRODUCT, event, group });
  await subscription.open();
  const id = await client.messageBroker.publish({ ...PRODUCT, event, json: { retry: true } });
  const iterator = subscription[Symbol.asyncIterator]();
  const [first] = await take(iterator, 1);
  assert.equal(first.id, id);
  assert.equal(first.deliveryAttempt, 1);
  first.nack();
  const [second] = await take(iterator, 1);
  assert.equal(second.id, id);
  assert.equal(second.deliveryAttempt, 2);
  second.ack();
  first.ack(); // no longer outstanding: the server reports it stale
  for (let i = 0; i < 50 && subscription.staleAcks === 0; i++) await new Promise((r) => setTimeout(r, 20));
  assert.equal(subscription.staleAcks, 1);
  await subscription.close();
});

test("a dropped stream reconnects and the unacked message is delivered again", async () => {
  const group = unique("dropped");
  const event = "events:dropped";
  const cut = await proxy();
  const viaProxy = new Processor({ address: cut.address, timeoutMs: 10_000 });
  try {
    const subscription = viaProxy.messageBroker.subscribe({ ...PRODUCT, event, group, maxBackoffMs: 200 });
    await subscription.open();
    const id = await client.messageBroker.publish({ ...PRODUCT, event, json: { once: "more" } });
    const iterator = subscription[Symbol.asyncIterator]();
    const [first] = await take(iterator, 1);
    assert.equal(first.id, id);
    cut.drop(); // the connection dies: the stream ends with UNAVAILABLE, the client reconnects
    const [second] = await take(iterator, 1, 15_000);
    assert.equal(second.id, id);
    assert.equal(second.deliveryAttempt, 2);
    assert.ok(subscription.reconnects >= 1);
    first.ack(); // from the dropped stream: ignored
    second.ack();
    await subscription.close();
  } finally {
    viaProxy.close();
    cut.close();
  }
});

test("errors end the loop typed; break closes the subscription", async () => {
  const unknown = client.messageBroker.subscribe({ ...PRODUCT, event: "events:nope", group: "g" });
  await assert.rejects(
    (async () => {
      for await (const message of unknown) void message;
    })(),
    { name: "NotFoundError", reason: "TOPIC_NOT_FOUND" },
  );

  const group = unique("break");
  const subscription = client.messageBroker.subscribe({ ...PRODUCT, event: "events:acked", group, autoAck: true });
  await subscription.open();
  await client.messageBroker.publish({ ...PRODUCT, event: "events:acked", json: 1 });
  for await (const message of subscription) {
    assert.equal(message.json(), 1);
    break;
  }
  const done = await subscription[Symbol.asyncIterator]().next();
  assert.equal(done.done, true);
});
