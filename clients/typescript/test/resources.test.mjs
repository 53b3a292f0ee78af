// The services beyond actions, brokers and sessions: storage, databases and migrations, notifications.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { after, test } from "node:test";
import { AlreadyExistsError } from "../dist/index.js";
import { PRODUCT, processor, unique } from "./helpers.mjs";

const client = processor();
after(() => client.close());
const FILES = { ...PRODUCT, event: "files" };

test("storage: save, read, list, upload in chunks, download a range, no signed URL on fs without its listener, delete", async () => {
  const prefix = `${unique("ts")}/`;
  const saved = await client.storage.save({ ...FILES, fileName: `${prefix}hello.txt`, data: Buffer.from("Hello, files!"), fileMetadata: { by: "ts" } });
  assert.equal(saved.size, 13);
  assert.equal(saved.contentType, "text/plain");
  assert.ok(saved.updateTime instanceof Date);
  const read = await client.storage.read({ ...FILES, fileName: `${prefix}hello.txt` });
  assert.equal(read.data.toString(), "Hello, files!");
  assert.equal(read.mimeType, "text/plain");
  assert.equal(read.file.metadata.by, "ts");

  const big = Buffer.alloc(300_000, 7);
  const parts = [big.subarray(0, 100_000), big.subarray(100_000)];
  const sha256 = createHash("sha256").update(big).digest("hex");
  const uploaded = await client.storage.upload({ ...FILES, fileName: `${prefix}big.bin`, source: parts, size: big.length, sha256, chunkSize: 64 * 1024 });
  assert.equal(uploaded.size, big.length);
  assert.equal(uploaded.sha256, sha256);
  const { file, chunks } = await client.storage.download({ ...FILES, fileName: `${prefix}big.bin`, offset: 10, length: 200_000, chunkSize: 50_000 });
  assert.equal(file.size, big.length);
  const got = [];
  for await (const chunk of chunks) got.push(chunk);
  assert.ok(got.length >= 4);
  assert.ok(Buffer.concat(got).equals(big.subarray(10, 200_010)));
  await assert.rejects(client.storage.upload({ ...FILES, fileName: `${prefix}bad.bin`, source: Buffer.from("x"), sha256: "0".repeat(64) }), { reason: "CHECKSUM_MISMATCH" });

  const names = [];
  for await (const info of client.storage.files({ ...FILES, prefix, pageSize: 1 })) names.push(info.fileName);
  assert.deepEqual(names, [`${prefix}big.bin`, `${prefix}hello.txt`]);
  await assert.rejects(client.storage.signedUrl({ ...FILES, fileName: `${prefix}hello.txt`, method: "PUT" }), {
    name: "FailedPreconditionError",
    reason: "SIGNED_URLS_DISABLED",
  });
  assert.equal(await client.storage.delete({ ...FILES, fileName: `${prefix}hello.txt` }), true);
  assert.equal(await client.storage.delete({ ...FILES, fileName: `${prefix}hello.txt` }), false);
  await assert.rejects(client.storage.read({ ...FILES, fileName: `${prefix}hello.txt` }), { name: "NotFoundError", reason: "FILE_NOT_FOUND" });
  await assert.rejects(client.storage.download({ ...FILES, fileName: `${prefix}nope` }), { name: "NotFoundError", reason: "FILE_NOT_FOUND" });
});

test("migrations and database actions with plain objects; a unique violation is typed", async () => {
  const DB = { ...PRODUCT, database: "main" };
  await client.migration.run(DB);
  const status = await client.migration.status(DB);
  assert.deepEqual(status.migrations.map((m) => m.tag), ["create_users"]);
  const id = unique("u");
  const email = `${id}@example.com`;
  const added = await client.database.execute({ ...DB, action: "add_user", input: { data: { id, email, name: "Ada" } }, idempotencyKey: `add-${id}` });
  assert.equal(added.affectedRows, 1);
  const found = await client.database.execute({ ...DB, action: "find_user", input: { filter: { email } } });
  assert.deepEqual(found.rows, [{ id, email, name: "Ada" }]);
  await assert.rejects(client.database.execute({ ...DB, action: "add_user", input: { data: { id: unique("u"), email } } }), (error) => {
    assert.ok(error instanceof AlreadyExistsError);
    assert.equal(error.reason, "DB_CONSTRAINT_VIOLATION");
    assert.equal(error.metadata.constraint_kind, "unique");
    return true;
  });
  const other = unique("u");
  const results = await client.database.batch({
    ...DB,
    steps: [
      { action: "add_user", input: { data: { id: other, email: `${other}@example.com` } } },
      { action: "find_user", input: { filter: { email: `${other}@example.com` } }, tag: "check" },
    ],
  });
  assert.equal(results[0].affectedRows, 1);
  assert.equal(results[1].rows[0].id, other);
});

test("notification.send: one result per channel", async () => {
  const sent = await client.notification.send({
    ...PRODUCT,
    event: "users:welcome",
    email: { to: ["Ada Lovelace <ada@example.com>"], variables: { name: "Ada" } },
    sms: { to: ["+447700900123"], variables: { name: "Ada" } },
  });
  assert.deepEqual(sent.results.map((r) => [r.channel, r.success, r.provider]), [["email", true, "log"], ["sms", true, "log"]]);
  await assert.rejects(
    client.notification.send({ ...PRODUCT, event: "users:welcome", email: { to: ["ada@example.com"] } }),
    (error) => {
      assert.equal(error.reason, "TEMPLATE_VARIABLES_MISSING");
      assert.deepEqual(error.fieldViolations.map((v) => v.field), ["email.variables"]);
      return true;
    },
  );
});
