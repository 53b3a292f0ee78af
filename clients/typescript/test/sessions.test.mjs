import assert from "node:assert/strict";
import { after, test } from "node:test";
import { PRODUCT, processor, unique } from "./helpers.mjs";

const client = processor();
after(() => client.close());

test("session start, verify, refresh, list and revoke", async () => {
  const userId = unique("user");
  const address = { ...PRODUCT, tag: "user" };
  const tokens = await client.session.start({ ...address, data: { userId, email: "ada@example.com" } });
  assert.match(tokens.token, /.+/);
  assert.ok(tokens.expireTime instanceof Date && tokens.expireTime > new Date());
  const session = await client.session.verify({ ...address, token: tokens.token });
  assert.deepEqual(session.data, { userId, email: "ada@example.com" });
  assert.equal(session.identifier, userId);
  assert.equal(session.sessionId, tokens.sessionId);
  assert.ok(session.expiresAt instanceof Date);
  assert.deepEqual((await client.session.decrypt({ ...address, token: tokens.token })).data, session.data);

  const renewed = await client.session.refresh({ ...address, refreshToken: tokens.refreshToken });
  assert.equal(renewed.sessionId, tokens.sessionId);
  const active = await client.session.listActive({ ...address, identifier: userId });
  assert.deepEqual(active.sessions.map((s) => s.sessionId), [tokens.sessionId]);

  assert.equal(await client.session.revoke({ ...address, identifier: userId }), 1);
  await assert.rejects(client.session.verify({ ...address, token: renewed.token }), { reason: "SESSION_REVOKED" });
  await assert.rejects(client.session.revoke({ ...address }), TypeError);
});

test("a session presented with an action run", async () => {
  const tokens = await client.session.start({ ...PRODUCT, tag: "user", data: { userId: unique("u") } });
  const result = await client.action.run({
    ...PRODUCT,
    app: "echo",
    event: "echo",
    session: { tag: "user", token: tokens.token },
    input: { body: { email: "s@example.com" } },
  });
  assert.equal(result.statusCode, 200);
  await assert.rejects(
    client.action.run({ ...PRODUCT, app: "echo", event: "echo", session: ["user", "forged"], input: { body: { email: "s@example.com" } } }),
    { reason: "SESSION_INVALID" },
  );
});
