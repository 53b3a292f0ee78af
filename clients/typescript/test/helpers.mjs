// What the tests share: the processors the Python side started (PROCESSOR_* variables) and a TCP proxy to cut.
import net from "node:net";
import { Processor } from "../dist/index.js";

export const ADDRESS = process.env.PROCESSOR_ADDRESS;
export const KEYED_ADDRESS = process.env.PROCESSOR_KEYED_ADDRESS;
export const API_KEY = process.env.PROCESSOR_API_KEY;
if (!ADDRESS) throw new Error("PROCESSOR_ADDRESS is not set: run these tests through tests/test_typescript_client.py");

export const PRODUCT = { product: "tsclient", env: "dev" };

export function processor(options = {}) {
  return new Processor({ address: ADDRESS, timeoutMs: 10_000, ...options });
}

/** A TCP proxy to the processor whose connections `drop()` cuts (the client sees UNAVAILABLE). */
export async function proxy(target = ADDRESS) {
  const [host, port] = target.split(":");
  const sockets = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), host);
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on("error", () => undefined);
      socket.on("close", () => sockets.delete(socket));
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    address: `127.0.0.1:${server.address().port}`,
    drop() {
      for (const socket of sockets) socket.destroy();
    },
    close() {
      this.drop();
      server.close();
    },
  };
}

/** The next `count` messages of a subscription's iterator, within `ms`. */
export async function take(iterator, count, ms = 10_000) {
  const messages = [];
  const timer = setTimeout(() => {
    throw new Error(`timed out after ${messages.length} of ${count} messages`);
  }, ms);
  try {
    while (messages.length < count) {
      const next = await iterator.next();
      if (next.done) throw new Error("the subscription ended");
      messages.push(next.value);
    }
  } finally {
    clearTimeout(timer);
  }
  return messages;
}

export function unique(prefix) {
  return `${prefix}-${process.pid}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
}

/** `check()`'s first truthy value, polled every 100 ms for up to `ms`. */
export async function until(check, what, ms = 15_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
