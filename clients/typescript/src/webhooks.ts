/**
 * Webhooks: emit an event to its subscribed endpoints, follow its deliveries, and watch the provider webhooks the
 * processor receives.
 *
 *   const emitted = await processor.webhook.emit({ product: "shop", env: "dev", event: "orders:paid",
 *                                                  payload: { orderId: "o-1" }, idempotencyKey: "o-1-paid" });
 *   for await (const received of processor.webhook.receive({ product: "shop", env: "dev", webhook: "payments",
 *                                                            group: "billing" })) {
 *     handle(received.json());
 *     received.ack();
 *   }
 *
 * `receive` is a stream of Subscribe's shape (docs/streaming.md): acks batched, reconnects on UNAVAILABLE,
 * unacked webhooks delivered again. Statuses read as lower-case words (`pending`, `succeeded`, ...).
 */
import { duration, paged, ResourceClient, type CallOptions } from "./call.js";
import { StreamItem, Subscription, type StreamOptions, type StreamSource } from "./brokers.js";
import {
  DeliveryStatus,
  WebhookServiceClient,
  type Delivery as ProtoDelivery,
  type ReceivedBatch,
  type ReceivedDelivery,
  type ReceivedWebhook as ProtoReceivedWebhook,
  type ReceiveRequest,
} from "./gen/ductape/processor/v1/webhook.js";

const STATUS_PREFIX = "DELIVERY_STATUS_";

/** A delivery of an emitted event to one endpoint, with its attempts (GetDelivery) and its status as a word. */
export type Delivery = Omit<ProtoDelivery, "status"> & { status: string };

function delivery(given: ProtoDelivery): Delivery {
  const name = DeliveryStatus[given.status];
  return { ...given, status: typeof name === "string" ? name.slice(STATUS_PREFIX.length).toLowerCase() : "" };
}

/** A received provider webhook as listed (ListReceived). */
export type StoredWebhook = ProtoReceivedWebhook;

/** A received webhook on a Receive stream. Ack it when done, or nack it to have it delivered again. */
export class ReceivedWebhook extends StreamItem {
  readonly id: string;
  readonly webhook: string;
  /** The provider's id of the webhook (its `webhook-id` header, or the like). */
  readonly webhookId: string;
  readonly receiveTime: Date | undefined;
  readonly body: Buffer;
  readonly contentType: string;
  readonly headers: Record<string, string>;

  constructor(received: ReceivedDelivery, subscription: Subscription<ReceivedWebhook>, generation: number) {
    super(received.ackId, received.deliveryAttempt, subscription, generation);
    const webhook = received.webhook!;
    this.id = webhook.id;
    this.webhook = webhook.webhook;
    this.webhookId = webhook.webhookId;
    this.receiveTime = webhook.receiveTime;
    this.body = webhook.body;
    this.contentType = webhook.contentType;
    this.headers = webhook.headers;
  }

  /** The body parsed as JSON. */
  json<T = unknown>(): T {
    return JSON.parse(this.body.toString("utf8")) as T;
  }
}

/** What `processor.webhook.receive` takes. Durations are in milliseconds. */
export interface ReceiveOptions extends StreamOptions {
  product: string;
  env: string;
  /** The webhook's tag. */
  webhook: string;
  /** The consumer group: receivers of one group share the webhooks. */
  group: string;
  maxInFlight?: number;
  maxBatch?: number;
  maxWaitMs?: number;
  ackDeadlineMs?: number;
}

/** `processor.webhook`: emit events, follow deliveries, watch received webhooks. */
export class WebhookClient extends ResourceClient<WebhookServiceClient> {
  /** Emit `event` (`webhook_tag:event`) with `payload` (a plain value) to every subscribed endpoint. */
  emit(
    request: { product: string; env: string; event: string; payload?: unknown; idempotencyKey?: string },
    options?: CallOptions,
  ): Promise<{ messageId: string; deliveryIds: string[]; duplicate: boolean }> {
    return this.caller.unary(
      this.stub,
      this.stub.emit,
      {
        product: request.product,
        env: request.env,
        event: request.event,
        payload: request.payload === undefined ? null : request.payload,
        idempotencyKey: request.idempotencyKey ?? "",
      },
      options,
    );
  }

  /** One page of an environment's deliveries, newest first (one webhook's, one message's, in one status). */
  async listDeliveries(
    request: { product: string; env: string; webhook?: string; messageId?: string; status?: string; pageSize?: number; pageToken?: string },
    options?: CallOptions,
  ): Promise<{ deliveries: Delivery[]; nextPageToken: string }> {
    const status = request.status ? DeliveryStatus[(STATUS_PREFIX + request.status.toUpperCase()) as keyof typeof DeliveryStatus] : 0;
    if (status === undefined) throw new TypeError(`unknown delivery status: ${request.status}`);
    const response = await this.caller.unary(
      this.stub,
      this.stub.listDeliveries,
      {
        product: request.product,
        env: request.env,
        webhook: request.webhook ?? "",
        messageId: request.messageId ?? "",
        status,
        pageSize: request.pageSize ?? 0,
        pageToken: request.pageToken ?? "",
      },
      options,
      true,
    );
    return { deliveries: response.deliveries.map(delivery), nextPageToken: response.nextPageToken };
  }

  /** One delivery with every attempt made. */
  async getDelivery(request: { product: string; env: string; deliveryId: string }, options?: CallOptions): Promise<Delivery> {
    return delivery((await this.caller.unary(this.stub, this.stub.getDelivery, request, options, true)).delivery!);
  }

  /** Deliver a delivery's message to its endpoint again, now. */
  async redeliver(request: { product: string; env: string; deliveryId: string }, options?: CallOptions): Promise<Delivery> {
    return delivery((await this.caller.unary(this.stub, this.stub.redeliver, request, options)).delivery!);
  }

  /** One page of the webhooks received on a webhook's receive path, newest first. */
  async listReceived(
    request: { product: string; env: string; webhook: string; pageSize?: number; pageToken?: string },
    options?: CallOptions,
  ): Promise<{ received: StoredWebhook[]; nextPageToken: string }> {
    return this.caller.unary(
      this.stub,
      this.stub.listReceived,
      {
        product: request.product,
        env: request.env,
        webhook: request.webhook,
        pageSize: request.pageSize ?? 0,
        pageToken: request.pageToken ?? "",
      },
      options,
      true,
    );
  }

  /** Every received webhook of a receive path, newest first, fetching pages as needed. */
  received(request: { product: string; env: string; webhook: string; pageSize?: number }, options?: CallOptions): AsyncGenerator<StoredWebhook> {
    return paged(async (pageToken) => {
      const page = await this.listReceived({ ...request, pageToken }, options);
      return { items: page.received, nextPageToken: page.nextPageToken };
    });
  }

  /** The received webhooks of one webhook, live, to iterate with `for await` (a stream of Subscribe's shape). */
  receive(options: ReceiveOptions): Subscription<ReceivedWebhook> {
    const stub = this.stub;
    const init: ReceiveRequest = {
      init: {
        product: options.product,
        env: options.env,
        webhook: options.webhook,
        group: options.group,
        maxInFlight: options.maxInFlight ?? 0,
        maxBatch: options.maxBatch ?? 0,
        maxWait: options.maxWaitMs === undefined ? undefined : duration(options.maxWaitMs),
        ackDeadline: options.ackDeadlineMs === undefined ? undefined : duration(options.ackDeadlineMs),
      },
    };
    const source: StreamSource<ReceivedWebhook> = {
      open: (metadata) => stub.receive(metadata, {}),
      init,
      items: (batch: ReceivedBatch, subscription, generation) =>
        batch.deliveries.map((received) => new ReceivedWebhook(received, subscription, generation)),
    };
    return new Subscription(source, this.caller, options);
  }
}
