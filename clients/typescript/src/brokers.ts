/**
 * Message brokers: publish, publish in batches, and consume a topic with `for await`.
 *
 *   const subscription = processor.messageBroker.subscribe({ product: "shop", env: "prd",
 *                                                             event: "events:user-created", group: "mailer" });
 *   for await (const message of subscription) {
 *     handle(message.json());
 *     message.ack();
 *   }
 *
 * A message published as JSON (`json: ...`) arrives as that value (`message.json()` returns it, nothing to parse);
 * one published as bytes keeps them (`message.data`; `message.json()` parses them).
 *
 * The protocol is docs/streaming.md. Acks are batched on the wire (every 10 ms, or 100 at once). The server never
 * has more than `maxInFlight` unacked messages out on the stream (its credit), so the messages this client holds
 * for the loop are bounded by it. When the stream ends with UNAVAILABLE (a replica shutting down, a network blip)
 * the subscription reconnects with jittered exponential backoff; messages that were not acked are delivered again
 * by the broker (and those received on the dropped stream and not yet handed to the loop are dropped here), so
 * handlers must tolerate repeats (at least once).
 */
import {
  status as Status,
  type ClientDuplexStream,
  type Metadata,
  type ServiceError,
  type StatusObject,
} from "@grpc/grpc-js";
import { duration, ResourceClient, type Caller, type CallMetadata, type CallOptions } from "./call.js";
import { fromServiceError, ProcessorError } from "./errors.js";
import {
  BrokerServiceClient,
  type OutgoingMessage,
  type MessageBatch,
  type ReceivedMessage,
  type SubscribeInit,
  type SubscribeRequest,
  type SubscribeResponse,
} from "./gen/ductape/processor/v1/broker.js";

const ACK_FLUSH_MS = 10;
const ACK_FLUSH_COUNT = 100;

/** A message to publish: `data` bytes (say what they are in `contentType`) or a `json` value. */
export interface MessageFields {
  data?: Uint8Array;
  json?: unknown;
  contentType?: string;
  attributes?: Record<string, string>;
  orderingKey?: string;
  idempotencyKey?: string;
}

/** The OutgoingMessage of `fields`; `json` is sent as a protobuf Value (JSON on the wire, `application/json`). */
export function outgoing(fields: MessageFields): OutgoingMessage {
  return {
    data: fields.data === undefined ? undefined : Buffer.from(fields.data.buffer, fields.data.byteOffset, fields.data.byteLength),
    json: fields.data === undefined ? (fields.json === undefined ? null : fields.json) : undefined,
    contentType: fields.contentType ?? "",
    attributes: fields.attributes ?? {},
    orderingKey: fields.orderingKey ?? "",
    idempotencyKey: fields.idempotencyKey ?? "",
  };
}

/** One batch entry's outcome: `messageId`, or the error's `code`, `reason` and `message`. */
export interface PublishResult {
  messageId: string;
  /** The gRPC status code; 0 (OK) when published. */
  code: Status;
  reason: string;
  message: string;
  ok: boolean;
}

/** Where a stream item's ack and nack go: its subscription. */
interface Settler {
  queueAck(ackId: string, generation: number): void;
  sendNack(ackId: string, generation: number, delayMs: number, deadLetter: boolean): void;
}

/** What a stream delivers (a broker's message, a received webhook): ack it when done, or nack it to have it
 * delivered again. */
export abstract class StreamItem {
  constructor(
    /** What to ack or nack it with, on the stream it came on. */
    readonly ackId: string,
    /** 1 on the first delivery, then 2, 3, ... */
    readonly deliveryAttempt: number,
    private readonly subscription: Settler,
    /** @internal the stream it came on */
    readonly generation: number,
  ) {}

  /** Done: it is not delivered again. Sent with the next batch of acks (within 10 ms). */
  ack(): void {
    this.subscription.queueAck(this.ackId, this.generation);
  }

  /** Deliver again after `delayMs`, or send to the dead-letter topic now (`deadLetter`). */
  nack(options: { delayMs?: number; deadLetter?: boolean } = {}): void {
    this.subscription.sendNack(this.ackId, this.generation, options.delayMs ?? 0, options.deadLetter ?? false);
  }
}

/** A delivered message. Ack it when done, or nack it to have it delivered again. Its fields are read from the
 * decoded `ReceivedMessage` when asked for (one is built for every message delivered). */
export class Message extends StreamItem {
  private bytes: Buffer | undefined;
  private value: unknown;
  private hasValue: boolean;

  constructor(
    private readonly received: ReceivedMessage,
    subscription: Settler,
    generation: number,
  ) {
    super(received.ackId, received.deliveryAttempt, subscription, generation);
    // `json` is undefined when the payload came as bytes; a JSON null comes as null.
    this.hasValue = received.json !== undefined;
    if (this.hasValue) this.value = received.json;
  }

  /** The message's id (its CloudEvents id), the same on every delivery. */
  get id(): string {
    return this.received.id;
  }

  /** The payload's media type. */
  get contentType(): string {
    return this.received.contentType;
  }

  /** The attributes it was published with. */
  get attributes(): Record<string, string> {
    return this.received.attributes;
  }

  /** When it was published. */
  get publishTime(): Date | undefined {
    return this.received.publishTime;
  }

  /** The CloudEvents source: `/ductape/<product>/<env>/<broker>`. */
  get source(): string {
    return this.received.source;
  }

  /** The CloudEvents type: the topic's name. */
  get type(): string {
    return this.received.type;
  }

  /** The ordering key it was published with. */
  get orderingKey(): string {
    return this.received.orderingKey;
  }

  /** The W3C trace context it was published with. */
  get traceparent(): string {
    return this.received.traceparent;
  }

  /** The W3C `tracestate` that travels with `traceparent`. */
  get tracestate(): string {
    return this.received.tracestate;
  }

  /** Whether it arrived as the JSON value it was published as (`json`) rather than as bytes. */
  get publishedAsJson(): boolean {
    return this.received.json !== undefined;
  }

  /** The payload as bytes; for a message published as JSON, its UTF-8 JSON (encoded on first use). */
  get data(): Buffer {
    this.bytes ??= this.publishedAsJson ? Buffer.from(JSON.stringify(this.value), "utf8") : this.received.data;
    return this.bytes;
  }

  /** The payload as a JSON value: the value it was published as, or its bytes parsed as JSON (once). */
  json<T = unknown>(): T {
    if (!this.hasValue) {
      this.value = JSON.parse(this.received.data.toString("utf8"));
      this.hasValue = true;
    }
    return this.value as T;
  }

  /** The payload as UTF-8 text. */
  text(): string {
    return this.data.toString("utf8");
  }
}

/** How a stream of Subscribe's shape (Subscribe, Receive) runs on the client. */
export interface StreamOptions {
  /** Ack each item when the loop asks for the next one. */
  autoAck?: boolean;
  /** Reconnect on UNAVAILABLE (default true). */
  reconnect?: boolean;
  /** The longest backoff between reconnects in milliseconds; default 5000. */
  maxBackoffMs?: number;
  /** Added to the stream's metadata, on every reconnect too. */
  metadata?: CallMetadata;
}

/** One kind of stream of Subscribe's shape: how to open it, its first request, and the items of a response. */
export interface StreamSource<Item extends StreamItem> {
  open(metadata: Metadata): ClientDuplexStream<any, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
  init: object;
  items(response: any, subscription: Subscription<Item>, generation: number): Item[]; // eslint-disable-line @typescript-eslint/no-explicit-any
}

/** What `processor.messageBroker.subscribe` takes. Durations are in milliseconds. */
export interface SubscribeOptions extends StreamOptions {
  product: string;
  env: string;
  /** `broker_tag:topic_tag`. */
  event: string;
  /** The consumer group: subscribers of one group share the messages. */
  group: string;
  /** Most unacked messages out on the stream (the server's credit); default 100. */
  maxInFlight?: number;
  /** Most messages in one response; default 100. */
  maxBatch?: number;
  /** How long a batch waits to fill after its first message; default 10 ms. */
  maxWaitMs?: number;
  /** Time to ack a message before it is delivered again; default 30 s. */
  ackDeadlineMs?: number;
  /** Deliveries before a message goes to `deadLetterEvent`; 0: unlimited. */
  maxDeliveries?: number;
  deadLetterEvent?: string;
  /** A message published as JSON arrives as its value (default true); false: as UTF-8 JSON bytes in `data`. */
  jsonValues?: boolean;
}

type Waiter<Item> = { resolve: (item: Item | undefined) => void; reject: (error: unknown) => void };

/**
 * An open subscription: iterate it with `for await`; `close()` ends it (so does leaving the loop with `break`).
 * `staleAcks` counts the acks and nacks the server ignored because their message was no longer outstanding,
 * `expiredAcks` those of them that came after the message's ack deadline; `reconnects` the streams reopened.
 */
export class Subscription<Item extends StreamItem = Message> implements AsyncIterable<Item>, Settler {
  reconnects = 0;
  staleAcks = 0;
  expiredAcks = 0;
  /** The server's id of the current stream (for logs), once open. */
  subscriptionId = "";

  private call: ClientDuplexStream<any, any> | undefined; // eslint-disable-line @typescript-eslint/no-explicit-any
  private generation = 0;
  private closed = false;
  private started: Promise<void> | undefined;
  private readyResolve: (() => void) | undefined;
  private readyReject: ((error: unknown) => void) | undefined;
  private readonly readyPromise: Promise<void>;
  private readonly buffer: Item[] = [];
  private head = 0;
  private waiter: Waiter<Item> | undefined;
  private failure: unknown;
  private finished = false;
  private pendingAcks: string[] = [];
  private flushTimer: NodeJS.Timeout | undefined;
  private callEnded = true;

  constructor(
    private readonly source: StreamSource<Item>,
    private readonly caller: Caller,
    private readonly options: StreamOptions,
  ) {
    this.readyPromise = new Promise<void>((resolve, reject) => {
      this.readyResolve = resolve;
      this.readyReject = reject;
    });
    this.readyPromise.catch(() => undefined); // a failure is also reported to the loop
  }

  /** Open the stream now (the loop opens it otherwise); resolves once the server answered `ready`. */
  open(): Promise<void> {
    this.started ??= this.pump();
    return this.readyPromise;
  }

  /** The messages, for `for await`; leaving the loop (break, return, throw) closes the subscription, and so does
   * its end. Written as a plain iterator, not an async generator: one promise per message instead of three. */
  [Symbol.asyncIterator](): AsyncIterator<Item, undefined> {
    void this.open();
    let last: Item | undefined;
    const finish = async (): Promise<IteratorResult<Item, undefined>> => {
      await this.close();
      return { done: true, value: undefined };
    };
    const step = (message: Item | undefined): Promise<IteratorResult<Item, undefined>> | IteratorResult<Item, undefined> => {
      if (message === undefined) return finish();
      last = message;
      return { done: false, value: message };
    };
    return {
      next: () => {
        if (this.options.autoAck && last !== undefined) last.ack();
        last = undefined;
        const buffered = this.take();
        if (buffered !== undefined) return Promise.resolve({ done: false, value: (last = buffered) });
        return this.next().then(step, async (error: unknown) => {
          await this.close();
          throw error;
        });
      },
      return: finish,
    };
  }

  /** The next buffered message, if any. */
  private take(): Item | undefined {
    if (this.head >= this.buffer.length) return undefined;
    const message = this.buffer[this.head]!;
    this.buffer[this.head++] = undefined as unknown as Item;
    if (this.head === this.buffer.length) {
      this.buffer.length = 0;
      this.head = 0;
    }
    return message;
  }

  private next(): Promise<Item | undefined> {
    const buffered = this.take();
    if (buffered !== undefined) return Promise.resolve(buffered);
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (this.finished || this.closed) return Promise.resolve(undefined);
    return new Promise((resolve, reject) => (this.waiter = { resolve, reject }));
  }

  private deliver(message: Item): void {
    const waiter = this.waiter;
    if (waiter) {
      this.waiter = undefined;
      waiter.resolve(message);
    } else this.buffer.push(message);
  }

  private end(error?: unknown): void {
    if (error !== undefined) {
      this.failure = error;
      this.readyReject?.(error);
    }
    this.finished = true;
    const waiter = this.waiter;
    this.waiter = undefined;
    if (waiter) (error !== undefined ? waiter.reject(error) : waiter.resolve(undefined));
  }

  /** One stream: open, read until it ends; resolves when it ended OK, rejects with its error. */
  private stream(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.pendingAcks = [];
      const generation = ++this.generation;
      const call = this.source.open(this.caller.metadata(this.options.metadata));
      this.call = call;
      this.callEnded = false;
      let first = true;
      call.on("data", (response: SubscribeResponse) => {
        if (first) {
          first = false;
          if (!response.ready) {
            call.cancel();
            reject(new ProcessorError(Status.INTERNAL, "the server did not confirm the subscription"));
            return;
          }
          this.subscriptionId = response.ready.subscriptionId;
          this.readyResolve?.();
          return;
        }
        if (response.staleAcks) {
          this.staleAcks += response.staleAcks.ackIds.length;
          this.expiredAcks += response.staleAcks.expiredAckIds.length;
        } else if (response.batch) {
          for (const item of this.source.items(response.batch, this, generation)) this.deliver(item);
        }
      });
      call.on("error", (error: ServiceError) => reject(error));
      call.on("status", (status: StatusObject) => {
        this.callEnded = true;
        if (status.code === Status.OK) resolve();
      });
      call.write(this.source.init);
    });
  }

  private async pump(): Promise<void> {
    let backoff = 100;
    const maxBackoff = this.options.maxBackoffMs ?? 5000;
    while (!this.closed) {
      try {
        await this.stream();
        this.end();
        return;
      } catch (error) {
        if (this.closed) break;
        const code = (error as ServiceError).code;
        if (error instanceof ProcessorError || this.options.reconnect === false || code !== Status.UNAVAILABLE) {
          this.end(error instanceof ProcessorError ? error : fromServiceError(error as ServiceError));
          return;
        }
        if (this.subscriptionId !== "") backoff = 100; // the dropped stream had opened: start the backoff over
        this.subscriptionId = "";
      }
      // Messages of the dropped stream not yet handed out: the broker delivers them again.
      this.dropGeneration(this.generation);
      this.reconnects++;
      await new Promise((resolve) => setTimeout(resolve, backoff * (0.5 + Math.random() / 2)));
      backoff = Math.min(backoff * 2, maxBackoff);
    }
    this.end();
  }

  private dropGeneration(generation: number): void {
    const kept = this.buffer.slice(this.head).filter((message) => message.generation !== generation);
    this.buffer.length = 0;
    this.head = 0;
    this.buffer.push(...kept);
  }

  /** @internal */
  queueAck(ackId: string, generation: number): void {
    if (generation !== this.generation || this.closed) return; // from an earlier stream: delivered again anyway
    this.pendingAcks.push(ackId);
    if (this.pendingAcks.length >= ACK_FLUSH_COUNT) this.flush();
    else this.flushTimer ??= setTimeout(() => this.flush(), ACK_FLUSH_MS);
  }

  /** @internal */
  sendNack(ackId: string, generation: number, delayMs: number, deadLetter: boolean): void {
    if (generation !== this.generation || this.closed) return;
    this.flush();
    this.call?.write({ nack: { ackIds: [ackId], delay: duration(delayMs), deadLetter } });
  }

  private flush(): void {
    if (this.flushTimer !== undefined) {
      clearTimeout(this.flushTimer);
      this.flushTimer = undefined;
    }
    if (this.pendingAcks.length > 0 && this.call) {
      const ackIds = this.pendingAcks;
      this.pendingAcks = [];
      this.call.write({ ack: { ackIds } });
    }
  }

  /** Flush acks and end the stream; unacked messages go back to the group. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.flush();
    this.closed = true;
    const call = this.call;
    this.buffer.length = 0; // their acks would be ignored: the broker delivers them again
    this.head = 0;
    this.end();
    if (call !== undefined && !this.callEnded) {
      await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        call.cancel();
        resolve();
      }, 2000);
      call.on("status", () => {
        clearTimeout(timer);
        resolve();
      });
      call.on("error", () => undefined);
      call.end(); // half-close: the server ends the stream once it has read our acks
      });
    }
    if (this.started) await this.started.catch(() => undefined);
  }
}

/** `processor.messageBroker`: publish and subscribe. */
export class BrokerClient extends ResourceClient<BrokerServiceClient> {
  /** Publish one message to `broker_tag:topic_tag`; resolves with its id. */
  async publish(
    request: { product: string; env: string; event: string } & MessageFields,
    options?: CallOptions,
  ): Promise<string> {
    const { product, env, event } = request;
    const response = await this.caller.unary(
      this.stub,
      this.stub.publish,
      { product, env, event, message: outgoing(request) },
      options,
    );
    return response.messageId;
  }

  /** Publish many messages to one topic; one result per message, in order. */
  async publishBatch(
    request: { product: string; env: string; event: string; messages: MessageFields[] },
    options?: CallOptions,
  ): Promise<PublishResult[]> {
    const { product, env, event } = request;
    const response = await this.caller.unary(
      this.stub,
      this.stub.publishBatch,
      { product, env, event, messages: request.messages.map(outgoing) },
      options,
    );
    return response.results.map((r) => ({
      messageId: r.messageId,
      code: r.code as Status,
      reason: r.reason,
      message: r.message,
      ok: r.code === 0,
    }));
  }

  /** A subscription to iterate with `for await`; the same `group` shares the messages. */
  subscribe(options: SubscribeOptions): Subscription {
    const init: SubscribeInit = {
      product: options.product,
      env: options.env,
      event: options.event,
      group: options.group,
      maxInFlight: options.maxInFlight ?? 0,
      maxBatch: options.maxBatch ?? 0,
      maxWait: options.maxWaitMs === undefined ? undefined : duration(options.maxWaitMs),
      ackDeadline: options.ackDeadlineMs === undefined ? undefined : duration(options.ackDeadlineMs),
      maxDeliveries: options.maxDeliveries ?? 0,
      deadLetterEvent: options.deadLetterEvent ?? "",
      jsonValues: options.jsonValues ?? true,
    };
    const stub = this.stub;
    const source: StreamSource<Message> = {
      open: (metadata) => stub.subscribe(metadata, {}),
      init: { init } satisfies SubscribeRequest,
      items: (batch: MessageBatch, subscription, generation) =>
        batch.messages.map((received) => new Message(received, subscription, generation)),
    };
    return new Subscription(source, this.caller, options);
  }
}
