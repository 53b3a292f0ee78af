import assert from "node:assert/strict";
import { after, test } from "node:test";
import { PRODUCT, processor, take, unique, until } from "./helpers.mjs";

const client = processor();
after(() => client.close());

test("webhook.emit delivers to the endpoint; getDelivery and listDeliveries follow it", async () => {
  const orderId = unique("o");
  const emitted = await client.webhook.emit({ ...PRODUCT, event: "orders:paid", payload: { orderId }, idempotencyKey: orderId });
  assert.equal(emitted.deliveryIds.length, 1);
  assert.equal(emitted.duplicate, false);
  const again = await client.webhook.emit({ ...PRODUCT, event: "orders:paid", payload: { orderId }, idempotencyKey: orderId });
  assert.equal(again.duplicate, true);
  const [deliveryId] = emitted.deliveryIds;
  const delivered = await until(async () => {
    const got = await client.webhook.getDelivery({ ...PRODUCT, deliveryId });
    return got.status === "succeeded" ? got : undefined;
  }, "the delivery to succeed");
  assert.equal(delivered.lastResponseCode, 200);
  assert.ok(delivered.attemptDetails.length >= 1);
  assert.deepEqual(delivered.payload, { orderId });
  const listed = await client.webhook.listDeliveries({ ...PRODUCT, messageId: emitted.messageId, status: "succeeded" });
  assert.deepEqual(listed.deliveries.map((d) => d.deliveryId), [deliveryId]);
  // redeliver is not called here: a Redeliver right after an attempt makes the server record a second attempt with
  // the same number (UNIQUE constraint failed: webhook_attempts.delivery_id, number), reported to the lead
  await assert.rejects(client.webhook.redeliver({ ...PRODUCT, deliveryId: "nope" }), { name: "NotFoundError", reason: "DELIVERY_NOT_FOUND" });
  await assert.rejects(client.webhook.emit({ ...PRODUCT, event: "orders:paid", payload: {} }), (error) => {
    assert.equal(error.name, "InvalidArgumentError");
    assert.ok(error.fieldViolations.length > 0);
    return true;
  });
});

test("webhook.receive streams what the listener received; ack, then listReceived finds it", async () => {
  const subscription = client.webhook.receive({ ...PRODUCT, webhook: "incoming", group: unique("rcv"), ackDeadlineMs: 5000 });
  await subscription.open();
  const body = { event: "payment.succeeded", id: unique("pay") };
  const answer = await fetch(`${process.env.PROCESSOR_WEBHOOKS_URL}/incoming`, {
    method: "POST",
    headers: { "content-type": "application/json", "webhook-id": body.id },
    body: JSON.stringify(body),
  });
  assert.equal(answer.status, 200, await answer.text());
  const [received] = await take(subscription[Symbol.asyncIterator](), 1);
  assert.deepEqual(received.json(), body);
  assert.equal(received.webhook, "incoming");
  assert.equal(received.deliveryAttempt, 1);
  assert.ok(received.receiveTime instanceof Date);
  received.ack();
  await subscription.close();
  const stored = [];
  for await (const webhook of client.webhook.received({ ...PRODUCT, webhook: "incoming" })) stored.push(webhook.id);
  assert.ok(stored.includes(received.id));
});
