/**
 * Features: `processor.feature.run(...)` and the calls that read, follow and steer runs.
 *
 *   const run = await processor.feature.run({ product: "shop", env: "dev", feature: "signup",
 *                                             input: { email: "ada@example.com" }, wait: true });
 *   console.log(run.status, run.output);
 *   const started = await processor.feature.run({ product: "shop", env: "dev", feature: "signup", input: { ... } });
 *   for await (const event of processor.feature.watch({ product: "shop", env: "dev", processId: started.processId })) {
 *     if (event.step) console.log(event.step.sequence, event.step.event, event.step.call?.status);
 *   }
 *
 * Statuses read as lower-case words: a run is `running`, `completed`, `failed`, `rolled_back`, `rolling_back` or
 * `cancelled`; a call `pending`, `running`, `completed`, `failed` or `skipped`. A run that failed is data, not an
 * error: `run.ok` is false and `errorReason`, `errorMessage` and `failedStep` say why.
 */
import { paged, sessionRef, ResourceClient, type CallOptions, type SessionLike } from "./call.js";
import { fromServiceError } from "./errors.js";
import {
  FeatureRunStatus,
  FeatureServiceClient,
  FeatureServiceListRequest,
  FeatureServiceRunRequest,
  FeatureStepStatus,
  type FeatureCall as ProtoFeatureCall,
  type FeatureRun as ProtoFeatureRun,
  type FeatureStep as ProtoFeatureStep,
} from "./gen/ductape/processor/v1/feature.js";

type Enum = Record<string | number, string | number>;

/** `FEATURE_RUN_STATUS_ROLLED_BACK` -> `rolled_back`. */
function word(values: Enum, value: number, prefix: string): string {
  const name = values[value];
  return typeof name === "string" ? name.slice(prefix.length).toLowerCase() : "";
}

const RUN_PREFIX = "FEATURE_RUN_STATUS_";
const STEP_PREFIX = "FEATURE_STEP_STATUS_";

/** A run: the product, its environment (slug or name) and the run's `processId`. */
export interface RunAddress {
  product: string;
  env: string;
  processId: string;
}

/** What `processor.feature.run` takes. */
export interface RunFeatureOptions {
  product: string;
  env: string;
  feature: string;
  input?: Record<string, unknown>;
  session?: SessionLike;
  /** Wait for the run to end (within the call's deadline) before resolving. */
  wait?: boolean;
  idempotencyKey?: string;
  /** The product version to run (0 or absent: the one pinned for the environment). */
  version?: number;
}

/** One call of a run (an event's, or its compensation's) as recorded. */
export interface FeatureCall {
  status: string;
  attempts: number;
  startedAt: Date | undefined;
  endedAt: Date | undefined;
  output: unknown;
  errorReason: string;
  errorMessage: string;
}

/** One event of a run: its call and, once the run rolled back, its compensation (undefined: not made). */
export interface FeatureStep {
  sequence: string;
  event: string;
  type: string;
  call: FeatureCall | undefined;
  iterations: number;
  rollback: FeatureCall | undefined;
}

/** A run: where it stands, its output or why it failed, and (from get, and a waited run) its events. */
export interface FeatureRun {
  processId: string;
  product: string;
  env: string;
  feature: string;
  version: number;
  status: string;
  /** True once the run completed. */
  ok: boolean;
  input: Record<string, unknown>;
  output: unknown;
  errorReason: string;
  errorMessage: string;
  failedStep: string;
  steps: FeatureStep[];
  createdAt: Date | undefined;
  endedAt: Date | undefined;
  takeovers: number;
  replayOf: string;
  parentProcessId: string;
  raw: ProtoFeatureRun;
}

/** One change of a watched run: the event that changed (undefined when the run itself did), the run's status, and on
 * the stream's last event the ended run. */
export interface FeatureEvent {
  step: FeatureStep | undefined;
  status: string;
  run: FeatureRun | undefined;
}

function call(given: ProtoFeatureCall | undefined): FeatureCall | undefined {
  if (given === undefined) return undefined;
  return {
    status: word(FeatureStepStatus, given.status, STEP_PREFIX),
    attempts: given.attempts,
    startedAt: given.startTime,
    endedAt: given.endTime,
    output: given.output,
    errorReason: given.errorReason,
    errorMessage: given.errorMessage,
  };
}

function step(given: ProtoFeatureStep): FeatureStep {
  return {
    sequence: given.sequence,
    event: given.event,
    type: given.type,
    call: call(given.call),
    iterations: given.iterations,
    rollback: call(given.rollback),
  };
}

function run(given: ProtoFeatureRun): FeatureRun {
  const status = word(FeatureRunStatus, given.status, RUN_PREFIX);
  return {
    processId: given.processId,
    product: given.product,
    env: given.env,
    feature: given.feature,
    version: given.version,
    status,
    ok: status === "completed",
    input: given.input ?? {},
    output: given.output,
    errorReason: given.errorReason,
    errorMessage: given.errorMessage,
    failedStep: given.failedStep,
    steps: given.steps.map(step),
    createdAt: given.createTime,
    endedAt: given.endTime,
    takeovers: given.takeovers,
    replayOf: given.replayOf,
    parentProcessId: given.parentProcessId,
    raw: given,
  };
}

/** `processor.feature`: run features, read, follow, cancel, resume and replay their runs. */
export class FeatureClient extends ResourceClient<FeatureServiceClient> {
  /** Start a run of `feature`. With `wait`, resolves with the run once it ended (or as it stands at the deadline);
   * without, at once: its `processId` follows it (`get`, `watch`). */
  async run(request: RunFeatureOptions, options?: CallOptions): Promise<FeatureRun> {
    const response = await this.caller.unary(
      this.stub,
      this.stub.run,
      FeatureServiceRunRequest.fromPartial({
        product: request.product,
        env: request.env,
        feature: request.feature,
        input: request.input,
        session: sessionRef(request.session),
        wait: request.wait,
        idempotencyKey: request.idempotencyKey,
        version: request.version,
      }),
      options,
    );
    return run(response.run!);
  }

  /** A run and each of its events. */
  async get(address: RunAddress, options?: CallOptions): Promise<FeatureRun> {
    return run((await this.caller.unary(this.stub, this.stub.get, { run: address }, options, true)).run!);
  }

  /** One page of the environment's runs, newest first, without their events; of one `feature`, in one `status`. */
  async list(
    request: { product: string; env: string; feature?: string; status?: string; pageSize?: number; pageToken?: string },
    options?: CallOptions,
  ): Promise<{ runs: FeatureRun[]; nextPageToken: string }> {
    const status = request.status ? FeatureRunStatus[(RUN_PREFIX + request.status.toUpperCase()) as keyof typeof FeatureRunStatus] : 0;
    if (status === undefined) throw new TypeError(`unknown run status: ${request.status}`);
    const response = await this.caller.unary(
      this.stub,
      this.stub.list,
      FeatureServiceListRequest.fromPartial({
        product: request.product,
        env: request.env,
        feature: request.feature,
        status: status as number,
        pageSize: request.pageSize,
        pageToken: request.pageToken,
      }),
      options,
      true,
    );
    return { runs: response.runs.map(run), nextPageToken: response.nextPageToken };
  }

  /** Every run of the environment (of one `feature`, in one `status`), newest first, fetching pages as needed. */
  runs(request: { product: string; env: string; feature?: string; status?: string }, options?: CallOptions): AsyncGenerator<FeatureRun> {
    return paged(async (pageToken) => {
      const page = await this.list({ ...request, pageToken }, options);
      return { items: page.runs, nextPageToken: page.nextPageToken };
    });
  }

  /** The run's recorded events, then each change until it ends (the last event carries the ended run). No deadline
   * unless `timeoutMs` is given; leaving the loop ends the stream. */
  async *watch(address: RunAddress, options?: CallOptions): AsyncGenerator<FeatureEvent> {
    const stream = this.stub.watch({ run: address }, this.caller.metadata(options?.metadata), this.caller.streamOptions(options));
    options?.signal?.addEventListener("abort", () => stream.cancel(), { once: true });
    try {
      for await (const event of stream) {
        yield {
          step: event.step === undefined ? undefined : step(event.step),
          status: word(FeatureRunStatus, event.status, RUN_PREFIX),
          run: event.run === undefined ? undefined : run(event.run),
        };
      }
    } catch (error) {
      throw fromServiceError(error as object);
    } finally {
      stream.cancel();
    }
  }

  /** Cancel a running run: no step starts after this, nothing is rolled back. */
  async cancel(address: RunAddress, options?: CallOptions): Promise<FeatureRun> {
    return run((await this.caller.unary(this.stub, this.stub.cancel, { run: address }, options)).run!);
  }

  /** Go on with a failed or cancelled run from where it stopped (its failed events run again). */
  async resume(address: RunAddress & { wait?: boolean }, options?: CallOptions): Promise<FeatureRun> {
    const { wait, ...ref } = address;
    return run((await this.caller.unary(this.stub, this.stub.resume, { run: ref, wait: wait ?? false }, options)).run!);
  }

  /** A new run with the run's input and session, on the run's version or `version`. */
  async replay(address: RunAddress & { version?: number; wait?: boolean }, options?: CallOptions): Promise<FeatureRun> {
    const { version, wait, ...ref } = address;
    const request = { run: ref, version: version ?? 0, wait: wait ?? false };
    return run((await this.caller.unary(this.stub, this.stub.replay, request, options)).run!);
  }
}
