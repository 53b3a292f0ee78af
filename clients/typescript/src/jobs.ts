/**
 * Jobs: `processor.job.schedule(...)` and the calls that steer jobs and read and follow their runs.
 *
 *   const job = await processor.job.schedule({ product: "shop", env: "dev", event: "mailer:send_welcome",
 *                                              input: { body: { email: "ada@example.com" } }, delayMs: 30_000 });
 *   await processor.job.schedule({ product: "shop", env: "dev", kind: "publish", event: "events:user-created",
 *                                  input: { message: { ping: 1 } }, repeat: { cron: "30 1 * * *" }, name: "nightly" });
 *   for await (const run of processor.job.runs({ product: "shop", env: "dev", jobId: job.jobId })) console.log(run.status);
 *
 * `kind` is `action` (default), `database_action`, `notification`, `storage`, `publish` or `feature`. Times are Dates (or
 * epoch milliseconds), durations milliseconds; statuses read as lower-case words (`scheduled`, `succeeded`, ...).
 */
import { duration, paged, sessionRef, ResourceClient, type CallOptions, type SessionLike } from "./call.js";
import { fromServiceError } from "./errors.js";
import type { Duration } from "./gen/google/protobuf/duration.js";
import {
  JobServiceClient,
  JobServiceListRequest,
  JobServiceListRunsRequest,
  JobServiceScheduleRequest,
  JobStatus,
  OverlapPolicy,
  RunStatus,
  RunTrigger,
  TargetKind,
  type Job as ProtoJob,
  type JobRef,
  type JobRun as ProtoJobRun,
} from "./gen/ductape/processor/v1/job.js";

type Enum = Record<string | number, string | number>;

/** `JOB_STATUS_SCHEDULED` -> `scheduled`. */
function word(values: Enum, value: number, prefix: string): string {
  const name = values[value];
  return typeof name === "string" ? name.slice(prefix.length).toLowerCase() : "";
}

/** `scheduled` -> JOB_STATUS_SCHEDULED's number (0 for none). */
function numbered(values: Enum, given: string | undefined, prefix: string): number {
  if (!given) return 0;
  const value = values[prefix + given.toUpperCase()];
  if (typeof value !== "number") throw new TypeError(`unknown ${prefix.toLowerCase()}: ${given}`);
  return value;
}

const ms = (span: Duration | undefined): number => (span ? span.seconds * 1000 + span.nanos / 1e6 : 0);
const moment = (at: Date | number): Date => (at instanceof Date ? at : new Date(at));

/** A job, by `jobId`, or by `name` for the environment's active job of that name. */
export interface JobAddress {
  product: string;
  env: string;
  jobId?: string;
  name?: string;
}

/** What `processor.job.schedule` takes. */
export interface ScheduleOptions {
  product: string;
  env: string;
  /** The target: `app:action`, `database:action`, `notification:message`, `broker:topic`, ... */
  event: string;
  kind?: "action" | "database_action" | "notification" | "storage" | "publish" | "feature";
  /** The target's input, as a plain object. */
  input?: Record<string, unknown>;
  session?: SessionLike;
  startAt?: Date | number;
  delayMs?: number;
  repeat?: { cron?: string; everyMs?: number; timezone?: string; limit?: number; endAt?: Date | number };
  /** A count of retries, or the policy. */
  retries?: number | { maxRetries?: number; initialDelayMs?: number; maxDelayMs?: number; jitter?: boolean };
  overlap?: "skip" | "buffer_one" | "allow";
  catchUpWindowMs?: number;
  name?: string;
  replace?: boolean;
  idempotencyKey?: string;
}

/** What Schedule answers (Ductape's `{job_id, status}`), and when the job first runs. */
export interface ScheduledJob {
  jobId: string;
  status: string;
  nextRunAt: Date | undefined;
}

/** A job: what it runs (`kind`, `event`, `input`), its state and its next occurrence; `raw` is the message. */
export interface Job {
  jobId: string;
  name: string;
  kind: string;
  event: string;
  input: Record<string, unknown>;
  status: string;
  nextRunAt: Date | undefined;
  runs: number;
  declared: boolean;
  raw: ProtoJob;
}

/** One run: when it was due, started and ended, how it went, and what the target answered. */
export interface JobRun {
  runId: string;
  jobId: string;
  status: string;
  trigger: string;
  dueAt: Date | undefined;
  startedAt: Date | undefined;
  endedAt: Date | undefined;
  attempts: number;
  result: unknown;
  errorReason: string;
  errorMessage: string;
  processId: string;
  latenessMs: number;
  reclaimed: boolean;
}

function job(given: ProtoJob): Job {
  return {
    jobId: given.jobId,
    name: given.name,
    kind: word(TargetKind, given.target?.kind ?? 0, "TARGET_KIND_"),
    event: given.target?.address ?? "",
    input: given.target?.input ?? {},
    status: word(JobStatus, given.status, "JOB_STATUS_"),
    nextRunAt: given.nextRunAt,
    runs: given.runs,
    declared: given.declared,
    raw: given,
  };
}

function run(given: ProtoJobRun): JobRun {
  return {
    runId: given.runId,
    jobId: given.jobId,
    status: word(RunStatus, given.status, "RUN_STATUS_"),
    trigger: word(RunTrigger, given.trigger, "RUN_TRIGGER_"),
    dueAt: given.dueTime,
    startedAt: given.startTime,
    endedAt: given.endTime,
    attempts: given.attempts,
    result: given.result,
    errorReason: given.errorReason,
    errorMessage: given.errorMessage,
    processId: given.processId,
    latenessMs: ms(given.lateness),
    reclaimed: given.reclaimed,
  };
}

const ref = (address: JobAddress): JobRef => ({
  product: address.product,
  env: address.env,
  jobId: address.jobId ?? "",
  name: address.name ?? "",
});

/** `processor.job`: schedule jobs, steer them, read and follow their runs. */
export class JobClient extends ResourceClient<JobServiceClient> {
  /** Schedule `event` with `input`: at `startAt`, after `delayMs`, or now; on `repeat` if given. */
  async schedule(request: ScheduleOptions, options?: CallOptions): Promise<ScheduledJob> {
    const { repeat, retries } = request;
    const response = await this.caller.unary(
      this.stub,
      this.stub.schedule,
      JobServiceScheduleRequest.fromPartial({
        product: request.product,
        env: request.env,
        name: request.name,
        target: {
          kind: numbered(TargetKind, request.kind ?? "action", "TARGET_KIND_"),
          address: request.event,
          input: request.input,
          session: sessionRef(request.session),
        },
        startAt: request.startAt === undefined ? undefined : moment(request.startAt),
        delay: request.delayMs === undefined ? undefined : duration(request.delayMs),
        repeat: repeat && {
          cron: repeat.cron,
          every: repeat.everyMs === undefined ? undefined : duration(repeat.everyMs),
          timezone: repeat.timezone,
          limit: repeat.limit,
          endAt: repeat.endAt === undefined ? undefined : moment(repeat.endAt),
        },
        retry:
          retries === undefined
            ? undefined
            : typeof retries === "number"
              ? { maxRetries: retries }
              : {
                  maxRetries: retries.maxRetries,
                  initialDelay: retries.initialDelayMs === undefined ? undefined : duration(retries.initialDelayMs),
                  maxDelay: retries.maxDelayMs === undefined ? undefined : duration(retries.maxDelayMs),
                  jitter: retries.jitter,
                },
        overlap: numbered(OverlapPolicy, request.overlap, "OVERLAP_POLICY_"),
        catchUpWindow: request.catchUpWindowMs === undefined ? undefined : duration(request.catchUpWindowMs),
        replace: request.replace,
        idempotencyKey: request.idempotencyKey,
      }),
      options,
    );
    return {
      jobId: response.jobId,
      status: word(JobStatus, response.status, "JOB_STATUS_"),
      nextRunAt: response.nextRunAt,
    };
  }

  /** A job, by id or by the name of an active job. */
  async get(address: JobAddress, options?: CallOptions): Promise<Job> {
    return job((await this.caller.unary(this.stub, this.stub.get, { job: ref(address) }, options, true)).job!);
  }

  /** Cancel a job (its runs waiting for a retry too). */
  async cancel(address: JobAddress, options?: CallOptions): Promise<Job> {
    return job((await this.caller.unary(this.stub, this.stub.cancel, { job: ref(address) }, options)).job!);
  }

  /** Pause a scheduled job. */
  async pause(address: JobAddress, options?: CallOptions): Promise<Job> {
    return job((await this.caller.unary(this.stub, this.stub.pause, { job: ref(address) }, options)).job!);
  }

  /** Resume a paused job. */
  async resume(address: JobAddress, options?: CallOptions): Promise<Job> {
    return job((await this.caller.unary(this.stub, this.stub.resume, { job: ref(address) }, options)).job!);
  }

  /** Run the job once now, outside its schedule; resolves with the pending run. */
  async triggerNow(address: JobAddress, options?: CallOptions): Promise<JobRun> {
    return run((await this.caller.unary(this.stub, this.stub.triggerNow, { job: ref(address) }, options)).run!);
  }

  /** One page of the environment's jobs, newest first. */
  async list(
    request: { product: string; env: string; status?: string; name?: string; kind?: string; pageSize?: number; pageToken?: string },
    options?: CallOptions,
  ): Promise<{ jobs: Job[]; nextPageToken: string }> {
    const response = await this.caller.unary(
      this.stub,
      this.stub.list,
      JobServiceListRequest.fromPartial({
        product: request.product,
        env: request.env,
        status: numbered(JobStatus, request.status, "JOB_STATUS_"),
        name: request.name,
        targetKind: numbered(TargetKind, request.kind, "TARGET_KIND_"),
        pageSize: request.pageSize,
        pageToken: request.pageToken,
      }),
      options,
      true,
    );
    return { jobs: response.jobs.map(job), nextPageToken: response.nextPageToken };
  }

  /** One page of a job's runs, newest due first; only those of one `status` (`succeeded`, ...) when given. */
  async listRuns(
    request: JobAddress & { status?: string; pageSize?: number; pageToken?: string },
    options?: CallOptions,
  ): Promise<{ runs: JobRun[]; nextPageToken: string }> {
    const response = await this.caller.unary(
      this.stub,
      this.stub.listRuns,
      JobServiceListRunsRequest.fromPartial({
        job: ref(request),
        status: numbered(RunStatus, request.status, "RUN_STATUS_"),
        pageSize: request.pageSize,
        pageToken: request.pageToken,
      }),
      options,
      true,
    );
    return { runs: response.runs.map(run), nextPageToken: response.nextPageToken };
  }

  /** Every run of a job, newest due first, fetching pages as needed. */
  runs(request: JobAddress & { status?: string }, options?: CallOptions): AsyncGenerator<JobRun> {
    return paged(async (pageToken) => {
      const page = await this.listRuns({ ...request, pageToken }, options);
      return { items: page.runs, nextPageToken: page.nextPageToken };
    });
  }

  /** The runs of the environment (or of one job) as they change, until the loop stops (which ends the stream).
   * No deadline unless `timeoutMs` is given. */
  async *watchRuns(request: { product: string; env: string; jobId?: string }, options?: CallOptions): AsyncGenerator<JobRun> {
    const call = this.stub.watchRuns(
      { product: request.product, env: request.env, jobId: request.jobId ?? "" },
      this.caller.metadata(options?.metadata),
      this.caller.streamOptions(options),
    );
    options?.signal?.addEventListener("abort", () => call.cancel(), { once: true });
    try {
      for await (const event of call) yield run(event.run!);
    } catch (error) {
      throw fromServiceError(error as object);
    } finally {
      call.cancel();
    }
  }
}
