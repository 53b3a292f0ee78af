// Each error kind, decoded from grpc-status-details-bin: reason, domain, metadata, field violations, retry delay.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, test } from "node:test";
import {
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  Processor,
  ProcessorError,
  UnauthenticatedError,
  UnavailableError,
  status,
} from "../dist/index.js";
import { API_KEY, KEYED_ADDRESS, PRODUCT, processor, unique } from "./helpers.mjs";

const client = processor();
after(() => client.close());

test("INVALID_ARGUMENT: INVALID_INPUT with one field violation per bad field", async () => {
  await assert.rejects(
    client.action.run({ ...PRODUCT, app: "echo", event: "echo", input: { body: { email: "not-an-email", profile: "text" } } }),
    (error) => {
      assert.ok(error instanceof InvalidArgumentError);
      assert.ok(error instanceof ProcessorError);
      assert.equal(error.code, status.INVALID_ARGUMENT);
      assert.equal(error.reason, "INVALID_INPUT");
      assert.equal(error.domain, "processor.ductape.dev");
      const fields = error.fieldViolations.map((v) => v.field).sort();
      assert.deepEqual(fields, ["input.body.email", "input.body.profile"]);
      assert.ok(error.fieldViolations.every((v) => v.description.length > 0));
      assert.match(error.requestId, /.+/);
      assert.match(error.message, /^INVALID_ARGUMENT: INVALID_INPUT: /);
      return true;
    },
  );
});

test("INVALID_ARGUMENT: a missing request field names it", async () => {
  await assert.rejects(client.action.run({ product: "tsclient", env: "dev", app: "", event: "echo" }), (error) => {
    assert.ok(error instanceof InvalidArgumentError);
    assert.equal(error.reason, "INVALID_ARGUMENT");
    assert.ok(error.fieldViolations.some((v) => v.field === "app"), JSON.stringify(error.fieldViolations));
    return true;
  });
});

test("NOT_FOUND: the reason and the metadata naming the resource", async () => {
  await assert.rejects(client.product.get("nope"), (error) => {
    assert.ok(error instanceof NotFoundError);
    assert.equal(error.reason, "PRODUCT_NOT_FOUND");
    assert.deepEqual(error.metadata, { product: "nope" });
    return true;
  });
  await assert.rejects(client.action.run({ ...PRODUCT, app: "nope", event: "echo" }), (error) => {
    assert.ok(error instanceof NotFoundError);
    assert.equal(error.reason, "APP_NOT_FOUND");
    assert.equal(error.metadata.app, "nope");
    return true;
  });
});

test("UNAUTHENTICATED: SESSION_INVALID for a forged token", async () => {
  await assert.rejects(client.session.verify({ ...PRODUCT, tag: "user", token: "forged" }), (error) => {
    assert.ok(error instanceof UnauthenticatedError);
    assert.equal(error.reason, "SESSION_INVALID");
    return true;
  });
});

test("UNAUTHENTICATED: API_KEY_MISSING and API_KEY_INVALID over mTLS; apiKey is sent as a bearer token", async () => {
  const tls = {
    rootCerts: readFileSync(process.env.PROCESSOR_TLS_CA),
    certChain: readFileSync(process.env.PROCESSOR_TLS_CLIENT_CERT),
    privateKey: readFileSync(process.env.PROCESSOR_TLS_CLIENT_KEY),
  };
  const anonymous = new Processor({ address: KEYED_ADDRESS, tls });
  const wrong = new Processor({ address: KEYED_ADDRESS, tls, apiKey: "wrong" });
  const keyed = new Processor({ address: KEYED_ADDRESS, tls, apiKey: API_KEY });
  const noCertificate = new Processor({ address: KEYED_ADDRESS, tls: { rootCerts: tls.rootCerts }, apiKey: API_KEY, timeoutMs: 3000 });
  const plaintext = new Processor({ address: KEYED_ADDRESS, apiKey: API_KEY, timeoutMs: 3000 });
  try {
    await assert.rejects(anonymous.product.get("tsclient"), { name: "UnauthenticatedError", reason: "API_KEY_MISSING" });
    await assert.rejects(wrong.product.get("tsclient"), { name: "UnauthenticatedError", reason: "API_KEY_INVALID" });
    assert.equal((await keyed.product.get("tsclient")).version.product, "tsclient");
    await assert.rejects(noCertificate.product.get("tsclient"), { name: "UnavailableError" });
    await assert.rejects(plaintext.product.get("tsclient"), { name: "UnavailableError" });
  } finally {
    for (const client of [anonymous, wrong, keyed, noCertificate, plaintext]) client.close();
  }
});

test("UNAVAILABLE: UPSTREAM_UNREACHABLE, then CIRCUIT_OPEN with the retry delay", async () => {
  const ping = () => client.action.run({ ...PRODUCT, app: "down", event: "ping" });
  await assert.rejects(ping(), (error) => {
    assert.ok(error instanceof UnavailableError);
    assert.equal(error.reason, "UPSTREAM_UNREACHABLE");
    return true;
  });
  await assert.rejects(ping(), { reason: "UPSTREAM_UNREACHABLE" });
  await assert.rejects(ping(), (error) => {
    assert.ok(error instanceof UnavailableError);
    assert.equal(error.reason, "CIRCUIT_OPEN");
    assert.ok(error.retryAfterMs > 0 && error.retryAfterMs <= 30_000, String(error.retryAfterMs));
    return true;
  });
});

test("FAILED_PRECONDITION: IDEMPOTENCY_KEY_REUSED", async () => {
  const idempotencyKey = unique("key");
  const first = await client.action.run({ ...PRODUCT, app: "echo", event: "echo", idempotencyKey, input: { body: { email: "a@example.com" } } });
  const again = await client.action.run({ ...PRODUCT, app: "echo", event: "echo", idempotencyKey, input: { body: { email: "a@example.com" } } });
  assert.equal(first.attempts, 1);
  assert.equal(again.attempts, 0); // the first result, replayed without calling the upstream
  await assert.rejects(
    client.action.run({ ...PRODUCT, app: "echo", event: "echo", idempotencyKey, input: { body: { email: "b@example.com" } } }),
    (error) => {
      assert.ok(error instanceof FailedPreconditionError);
      assert.equal(error.reason, "IDEMPOTENCY_KEY_REUSED");
      return true;
    },
  );
});
