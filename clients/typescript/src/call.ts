/** The request glue every resource client shares: metadata (API key + per-call), default deadlines, typed errors. */
import {
  Metadata,
  credentials,
  type CallOptions as GrpcCallOptions,
  type Channel,
  type ChannelCredentials,
  type ClientOptions,
  type ClientUnaryCall,
  type ServiceError,
} from "@grpc/grpc-js";
import { fromServiceError, UnavailableError } from "./errors.js";
import type { Duration } from "./gen/google/protobuf/duration.js";
import type { SessionRef } from "./gen/ductape/processor/v1/common.js";

/** Metadata for one call: an object or [key, value] pairs; keys are sent in lower case. */
export type CallMetadata = Record<string, string> | ReadonlyArray<readonly [string, string]>;

/** What every facade method takes besides its own fields. */
export interface CallOptions {
  /** This call's deadline in milliseconds from now; default the processor's `timeoutMs` (30 s). 0: none. */
  timeoutMs?: number;
  /** gRPC metadata for this call only: a caller's `traceparent`, its own `x-request-id`. */
  metadata?: CallMetadata;
  /** Cancels the call (it then fails with CancelledError). */
  signal?: AbortSignal;
}

/** A user session presented with a call: Ductape's `{tag, token}`, or a [tag, token] pair. */
export type SessionLike = SessionRef | readonly [string, string];

export function sessionRef(session: SessionLike | undefined): SessionRef | undefined {
  if (session === undefined) return undefined;
  if (Array.isArray(session)) return { tag: session[0], token: session[1] };
  const { tag, token } = session as SessionRef;
  return { tag, token };
}

/** A protobuf Duration of `ms` milliseconds. */
export function duration(ms: number): Duration {
  const seconds = Math.trunc(ms / 1000);
  return { seconds, nanos: Math.round((ms - seconds * 1000) * 1e6) };
}

const RETRY_FIRST_DELAY_MS = 50;
const RETRY_MAX_DELAY_MS = 1000;

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<GrpcCallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

/** Adds the API key, the caller's metadata and the default deadline to each call; rejects with typed errors. */
export class Caller {
  private readonly base: ReadonlyArray<readonly [string, string]>;

  constructor(
    base: ReadonlyArray<readonly [string, string]>,
    readonly timeoutMs: number,
    readonly retries = 3,
  ) {
    this.base = base;
  }

  /** The client's metadata with `extra` added; an `extra` key replaces the client's value for that key. */
  metadata(extra?: CallMetadata): Metadata {
    const metadata = new Metadata();
    const added = extra === undefined ? [] : Array.isArray(extra) ? extra : Object.entries(extra);
    const replaced = new Set(added.map(([key]) => key.toLowerCase()));
    for (const [key, value] of this.base) if (!replaced.has(key)) metadata.add(key, value);
    for (const [key, value] of added) metadata.add(key.toLowerCase(), value);
    return metadata;
  }

  /** gRPC call options with the deadline of `options` (or the default). */
  callOptions(options?: CallOptions): Partial<GrpcCallOptions> {
    const timeoutMs = options?.timeoutMs ?? this.timeoutMs;
    return timeoutMs > 0 ? { deadline: Date.now() + timeoutMs } : {};
  }

  /** gRPC call options for a streamed call (an upload, a download, a watch): no default deadline, as a large file or
   * a long watch may take longer than any default; only the caller's own `timeoutMs` bounds it. */
  streamOptions(options?: CallOptions): Partial<GrpcCallOptions> {
    return this.callOptions({ timeoutMs: options?.timeoutMs ?? 0 });
  }

  /**
   * Run a unary method of a generated client; resolve with its response or reject with a ProcessorError.
   *
   * A call that is safe to repeat (`safe`: a read; or any request carrying an `idempotencyKey`) is retried when it
   * fails with UNAVAILABLE (a restarting server, a dropped connection, a store blip), up to `retries` more times,
   * 50 ms doubling to 1 s apart with full jitter, within the call's one deadline. Other calls are never repeated:
   * UNAVAILABLE does not say whether the server acted.
   */
  async unary<Req, Res>(
    client: object,
    method: UnaryMethod<Req, Res>,
    request: Req,
    options?: CallOptions,
    safe = false,
  ): Promise<Res> {
    const key = (request as { idempotencyKey?: unknown }).idempotencyKey;
    if (this.retries === 0 || !(safe || (typeof key === "string" && key !== ""))) {
      return this.once(client, method, request, this.callOptions(options), options);
    }
    const grpcOptions = this.callOptions(options);
    const deadline = grpcOptions.deadline as number | undefined;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.once(client, method, request, grpcOptions, options);
      } catch (error) {
        const pause = Math.random() * Math.min(RETRY_MAX_DELAY_MS, RETRY_FIRST_DELAY_MS * 2 ** (attempt - 1));
        const late = deadline !== undefined && Date.now() + pause >= deadline;
        if (!(error instanceof UnavailableError) || attempt > this.retries || late || options?.signal?.aborted) {
          throw error;
        }
        await new Promise((resolve) => setTimeout(resolve, pause));
      }
    }
  }

  private once<Req, Res>(
    client: object,
    method: UnaryMethod<Req, Res>,
    request: Req,
    grpcOptions: Partial<GrpcCallOptions>,
    options?: CallOptions,
  ): Promise<Res> {
    return new Promise<Res>((resolve, reject) => {
      const call = method.call(
        client,
        request,
        this.metadata(options?.metadata),
        grpcOptions,
        (error, response) => (error ? reject(fromServiceError(error)) : resolve(response)),
      );
      const signal = options?.signal;
      if (signal) {
        if (signal.aborted) call.cancel();
        else signal.addEventListener("abort", () => call.cancel(), { once: true });
      }
    });
  }
}

/** A resource's facade (`processor.action`, ...): the generated client of its service and the shared Caller. */
export abstract class ResourceClient<Stub> {
  constructor(
    protected readonly stub: Stub,
    protected readonly caller: Caller,
  ) {}
}

/** A generated service client on a shared channel. */
export function stub<T>(
  Client: new (address: string, credentials: ChannelCredentials, options?: Partial<ClientOptions>) => T,
  channel: Channel,
): T {
  return new Client("", credentials.createInsecure(), { channelOverride: channel });
}

/** Every item of a paged listing (AIP-158), fetching pages as needed. */
export async function* paged<Item>(
  page: (pageToken: string) => Promise<{ items: Item[]; nextPageToken: string }>,
): AsyncGenerator<Item> {
  let pageToken = "";
  do {
    const response = await page(pageToken);
    yield* response.items;
    pageToken = response.nextPageToken;
  } while (pageToken);
}
