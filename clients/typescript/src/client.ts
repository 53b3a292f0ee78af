/**
 * The facade: `Processor` and one small client per resource, with Ductape's names.
 *
 *   const processor = new Processor({ address: "127.0.0.1:50051", apiKey: process.env.PROCESSOR_API_KEY });
 *   const sent = await processor.action.run({ product: "shop", env: "dev", app: "mailer", event: "send_welcome",
 *                                             input: { body: { email: "ada@example.com" } } });
 *
 * Requests take plain JS objects (Struct and Value fields are converted inside), answers are plain objects with
 * Dates for timestamps. Every method takes `{ timeoutMs, metadata, signal }` as CallOptions.
 */
import { readFile } from "node:fs/promises";
import { extname } from "node:path";
import { Channel, credentials as grpcCredentials, type ChannelCredentials, type ChannelOptions } from "@grpc/grpc-js";
import { BrokerClient } from "./brokers.js";
import { Caller, paged, ResourceClient, sessionRef, stub, type CallOptions, type SessionLike } from "./call.js";
import { DatabaseClient, MigrationClient } from "./databases.js";
import { ActionServiceClient } from "./gen/ductape/processor/v1/action.js";
import { BrokerServiceClient } from "./gen/ductape/processor/v1/broker.js";
import { DatabaseServiceClient } from "./gen/ductape/processor/v1/database.js";
import { FeatureServiceClient } from "./gen/ductape/processor/v1/feature.js";
import { JobServiceClient } from "./gen/ductape/processor/v1/job.js";
import { MigrationServiceClient } from "./gen/ductape/processor/v1/migration.js";
import { NotificationServiceClient } from "./gen/ductape/processor/v1/notification.js";
import { StorageServiceClient } from "./gen/ductape/processor/v1/storage.js";
import { WebhookServiceClient } from "./gen/ductape/processor/v1/webhook.js";
import { ExecutionStatus, LogServiceClient, type ListExecutionsResponse } from "./gen/ductape/processor/v1/log.js";
import {
  ManifestFormat,
  ProductServiceClient,
  type ApplyResponse,
  type GetResponse,
  type ListVersionsResponse,
  type ProductVersion,
  type PromoteResponse,
  type ValidateResponse,
} from "./gen/ductape/processor/v1/product.js";
import { SessionServiceClient, type ListActiveResponse, type TokenPair } from "./gen/ductape/processor/v1/session.js";
import { FeatureClient } from "./features.js";
import { JobClient } from "./jobs.js";
import { NotificationClient } from "./notifications.js";
import { StorageClient } from "./storage.js";
import { WebhookClient } from "./webhooks.js";

/** How to reach a processor. */
export interface ProcessorOptions {
  /** host:port; default 127.0.0.1:50051. */
  address?: string;
  /** Sent as `authorization: Bearer <key>` with every call. */
  apiKey?: string;
  /** TLS: `true` for the system's roots, or PEM roots and a client certificate (mTLS). */
  tls?: boolean | { rootCerts?: Buffer; certChain?: Buffer; privateKey?: Buffer };
  /** Channel credentials you built (overrides `tls`). */
  credentials?: ChannelCredentials;
  /** The default deadline of each unary call in milliseconds; default 30000; 0: none. */
  timeoutMs?: number;
  /** How many times a call safe to repeat is retried on UNAVAILABLE (reads, and requests with an idempotency key);
   * default 3; 0: never. */
  retries?: number;
  /** grpc-js channel options (`grpc.keepalive_time_ms`, `grpc.max_receive_message_length`, ...). */
  channelOptions?: ChannelOptions;
}

/** The input of an action, one part per part of the HTTP request. */
export interface ActionInput {
  query?: Record<string, unknown>;
  params?: Record<string, unknown>;
  body?: Record<string, unknown>;
  headers?: Record<string, unknown>;
}

/** What `processor.action.run` takes. */
export interface RunActionRequest {
  product: string;
  env: string;
  app: string;
  event: string;
  input?: ActionInput;
  session?: SessionLike;
  cache?: string;
  retries?: number;
  version?: number;
  idempotencyKey?: string;
}

/** An action's answer: the upstream's status, headers and body (parsed JSON, or a Buffer), and how it was got. */
export interface ActionResult<Body = any> {
  statusCode: number;
  headers: Record<string, string>;
  /** The parsed JSON body, or the raw bytes (a Buffer) for any other content type. */
  body: Body;
  contentType: string;
  processId: string;
  attempts: number;
  cached: boolean;
  version: number;
  /** True for a 2xx answer. */
  ok: boolean;
}

/** `processor.action`: runs actions. */
export class ActionClient extends ResourceClient<ActionServiceClient> {
  /** Run an action; `input` has the parts `query`, `params`, `body` and `headers`, as plain objects. */
  async run<Body = any>(request: RunActionRequest, options?: CallOptions): Promise<ActionResult<Body>> {
    const input = request.input ?? {};
    const response = await this.caller.unary(
      this.stub,
      this.stub.run,
      {
        product: request.product,
        env: request.env,
        app: request.app,
        event: request.event,
        input: { query: input.query, params: input.params, body: input.body, headers: input.headers },
        session: sessionRef(request.session),
        cache: request.cache ?? "",
        retries: request.retries,
        version: request.version ?? 0,
        idempotencyKey: request.idempotencyKey ?? "",
      },
      options,
    );
    return {
      statusCode: response.statusCode,
      headers: response.headers,
      body: response.json !== undefined ? response.json : response.raw,
      contentType: response.contentType,
      processId: response.processId,
      attempts: response.attempts,
      cached: response.cached,
      version: response.version,
      ok: response.statusCode >= 200 && response.statusCode < 300,
    };
  }
}

/** A verified session: its data, id, the user's identifier and when the token expires. */
export interface Session {
  data: Record<string, unknown>;
  sessionId: string;
  identifier: string;
  expiresAt: Date | undefined;
}

interface SessionAddress {
  product: string;
  env: string;
  tag: string;
}

/** `processor.session`: start, verify (Ductape's `decrypt`), refresh, revoke, listActive. */
export class SessionClient extends ResourceClient<SessionServiceClient> {
  /** Start a session for `data`; returns `token`, `refreshToken`, `sessionId` and expiry times. */
  async start(request: SessionAddress & { data: Record<string, unknown> }, options?: CallOptions): Promise<TokenPair> {
    const { product, env, tag, data } = request;
    const response = await this.caller.unary(this.stub, this.stub.start, { product, env, tag, data }, options);
    return response.tokens!;
  }

  /** The session a token carries; rejects with UnauthenticatedError (SESSION_INVALID/EXPIRED/REVOKED). */
  async verify(request: SessionAddress & { token: string }, options?: CallOptions): Promise<Session> {
    const { product, env, tag, token } = request;
    const response = await this.caller.unary(this.stub, this.stub.verify, { product, env, tag, token }, options, true);
    return {
      data: response.data ?? {},
      sessionId: response.sessionId,
      identifier: response.identifier,
      expiresAt: response.expireTime,
    };
  }

  /** Ductape's name for `verify`. */
  decrypt(request: SessionAddress & { token: string }, options?: CallOptions): Promise<Session> {
    return this.verify(request, options);
  }

  /** A new token pair; the refresh token given stops working. */
  async refresh(request: SessionAddress & { refreshToken: string }, options?: CallOptions): Promise<TokenPair> {
    const { product, env, tag, refreshToken } = request;
    const response = await this.caller.unary(this.stub, this.stub.refresh, { product, env, tag, refreshToken }, options);
    return response.tokens!;
  }

  /** Revoke one session (`sessionId`) or every session of a user (`identifier`); resolves with how many. */
  async revoke(
    request: SessionAddress & ({ sessionId: string; identifier?: undefined } | { identifier: string; sessionId?: undefined }),
    options?: CallOptions,
  ): Promise<number> {
    const { product, env, tag, sessionId, identifier } = request;
    if ((sessionId === undefined) === (identifier === undefined)) {
      throw new TypeError("give exactly one of sessionId and identifier");
    }
    const response = await this.caller.unary(this.stub, this.stub.revoke, { product, env, tag, sessionId, identifier }, options);
    return response.revoked;
  }

  /** One page of active sessions, newest first. */
  listActive(
    request: SessionAddress & { identifier?: string; pageSize?: number; pageToken?: string },
    options?: CallOptions,
  ): Promise<ListActiveResponse> {
    const { product, env, tag } = request;
    return this.caller.unary(
      this.stub,
      this.stub.listActive,
      {
        product,
        env,
        tag,
        identifier: request.identifier ?? "",
        pageSize: request.pageSize ?? 0,
        pageToken: request.pageToken ?? "",
      },
      options,
      true,
    );
  }
}

const STATUSES = { "": ExecutionStatus.EXECUTION_STATUS_UNSPECIFIED, success: ExecutionStatus.EXECUTION_STATUS_SUCCESS, fail: ExecutionStatus.EXECUTION_STATUS_FAIL };

/** What `processor.log.listExecutions` takes. */
export interface ListExecutionsRequest {
  product: string;
  env?: string;
  /** `app:action`, ... */
  resource?: string;
  status?: "" | "success" | "fail";
  startTime?: Date;
  endTime?: Date;
  pageSize?: number;
  pageToken?: string;
}

/** `processor.log`: reads the execution log. */
export class LogClient extends ResourceClient<LogServiceClient> {
  /** One page of executions, newest first. */
  listExecutions(request: ListExecutionsRequest, options?: CallOptions): Promise<ListExecutionsResponse> {
    const status = STATUSES[request.status ?? ""];
    if (status === undefined) throw new TypeError('status must be "success", "fail" or ""');
    return this.caller.unary(
      this.stub,
      this.stub.listExecutions,
      {
        product: request.product,
        env: request.env ?? "",
        resource: request.resource ?? "",
        status,
        startTime: request.startTime,
        endTime: request.endTime,
        pageSize: request.pageSize ?? 0,
        pageToken: request.pageToken ?? "",
      },
      options,
      true,
    );
  }
}

/** A manifest: a path to a .yaml/.yml/.json file, or its bytes (the server detects the format). */
export type ManifestSource = string | Uint8Array;

const FORMATS: Record<string, ManifestFormat> = {
  ".json": ManifestFormat.MANIFEST_FORMAT_JSON,
  ".yaml": ManifestFormat.MANIFEST_FORMAT_YAML,
  ".yml": ManifestFormat.MANIFEST_FORMAT_YAML,
};

async function manifestBytes(manifest: ManifestSource): Promise<{ manifest: Buffer; format: ManifestFormat }> {
  if (typeof manifest !== "string") {
    return { manifest: Buffer.from(manifest), format: ManifestFormat.MANIFEST_FORMAT_UNSPECIFIED };
  }
  const format = FORMATS[extname(manifest).toLowerCase()] ?? ManifestFormat.MANIFEST_FORMAT_UNSPECIFIED;
  return { manifest: await readFile(manifest), format };
}

/** `processor.product`: the product registry: apply, validate, get, list and promote manifest versions. */
export class ProductClient extends ResourceClient<ProductServiceClient> {
  /** Store a manifest (a path, or YAML/JSON bytes) as the product's next version. */
  async apply(manifest: ManifestSource, options?: CallOptions): Promise<ApplyResponse> {
    return this.caller.unary(this.stub, this.stub.apply, await manifestBytes(manifest), options, true);
  }

  /** Every problem of a manifest, without storing it. */
  async validate(manifest: ManifestSource, options?: CallOptions): Promise<ValidateResponse> {
    return this.caller.unary(this.stub, this.stub.validate, await manifestBytes(manifest), options, true);
  }

  /** A version of the product: `version`, the one pinned for `env`, or the latest. */
  get(product: string, which: { version?: number; env?: string } = {}, options?: CallOptions): Promise<GetResponse> {
    const request = which.version !== undefined ? { product, version: which.version } : { product, env: which.env };
    return this.caller.unary(this.stub, this.stub.get, request, options, true);
  }

  /** One page of versions, newest first. */
  listVersions(
    product: string,
    page: { pageSize?: number; pageToken?: string } = {},
    options?: CallOptions,
  ): Promise<ListVersionsResponse> {
    return this.caller.unary(
      this.stub,
      this.stub.listVersions,
      { product, pageSize: page.pageSize ?? 0, pageToken: page.pageToken ?? "" },
      options,
      true,
    );
  }

  /** Every version, newest first, fetching pages as needed. */
  versions(product: string, page: { pageSize?: number } = {}, options?: CallOptions): AsyncGenerator<ProductVersion> {
    return paged(async (pageToken) => {
      const response = await this.listVersions(product, { pageSize: page.pageSize, pageToken }, options);
      return { items: response.versions, nextPageToken: response.nextPageToken };
    });
  }

  /** Pin `env` (slug or name) to `version`; promoting an older version rolls back. */
  promote(product: string, target: { env: string; version: number }, options?: CallOptions): Promise<PromoteResponse> {
    return this.caller.unary(this.stub, this.stub.promote, { product, env: target.env, version: target.version }, options);
  }
}

function channelCredentials(options: ProcessorOptions): ChannelCredentials {
  if (options.credentials) return options.credentials;
  const tls = options.tls;
  if (!tls) return grpcCredentials.createInsecure();
  if (tls === true) return grpcCredentials.createSsl();
  return grpcCredentials.createSsl(tls.rootCerts ?? null, tls.privateKey ?? null, tls.certChain ?? null);
}

/** A connection to a processor and its resource clients. `close()` closes the channel. */
export class Processor {
  readonly channel: Channel;
  readonly action: ActionClient;
  readonly session: SessionClient;
  readonly product: ProductClient;
  readonly log: LogClient;
  readonly messageBroker: BrokerClient;
  readonly database: DatabaseClient;
  /** Ductape's name for `database`. */
  readonly db: DatabaseClient;
  readonly migration: MigrationClient;
  readonly storage: StorageClient;
  readonly notification: NotificationClient;
  readonly job: JobClient;
  readonly webhook: WebhookClient;
  readonly feature: FeatureClient;

  constructor(options: ProcessorOptions | string = {}) {
    const opts = typeof options === "string" ? { address: options } : options;
    this.channel = new Channel(opts.address ?? "127.0.0.1:50051", channelCredentials(opts), opts.channelOptions ?? {});
    const caller = new Caller(opts.apiKey ? [["authorization", `Bearer ${opts.apiKey}`]] : [], opts.timeoutMs ?? 30_000, opts.retries ?? 3);
    const on = <Stub>(Client: new (address: string, credentials: ChannelCredentials) => Stub): Stub => stub(Client, this.channel);
    this.action = new ActionClient(on(ActionServiceClient), caller);
    this.session = new SessionClient(on(SessionServiceClient), caller);
    this.product = new ProductClient(on(ProductServiceClient), caller);
    this.log = new LogClient(on(LogServiceClient), caller);
    this.messageBroker = new BrokerClient(on(BrokerServiceClient), caller);
    this.database = new DatabaseClient(on(DatabaseServiceClient), caller);
    this.migration = new MigrationClient(on(MigrationServiceClient), caller);
    this.storage = new StorageClient(on(StorageServiceClient), caller);
    this.notification = new NotificationClient(on(NotificationServiceClient), caller);
    this.job = new JobClient(on(JobServiceClient), caller);
    this.webhook = new WebhookClient(on(WebhookServiceClient), caller);
    this.feature = new FeatureClient(on(FeatureServiceClient), caller);
    this.db = this.database;
  }

  /** Close the channel; calls in flight fail with CANCELLED/UNAVAILABLE. */
  close(): void {
    this.channel.close();
  }
}
