/** Databases and migrations: `processor.database.execute/batch`, `processor.migration.run/rollback/status/plan`. */
import { sessionRef, ResourceClient, type CallOptions, type SessionLike } from "./call.js";
import {
  BatchRequest,
  DatabaseServiceClient,
  ExecuteRequest,
  type BatchStep,
  type ExecuteResponse,
  type StepResult,
} from "./gen/ductape/processor/v1/database.js";
import {
  MigrationServiceClient,
  type MigrationServicePlanResponse,
  type MigrationServiceRollbackResponse,
  type MigrationServiceRunResponse,
  type MigrationServiceStatusResponse,
  type MigrationTarget,
} from "./gen/ductape/processor/v1/migration.js";

/** A database action's input: `data` (what a write stores) and `filter` (what selects rows), as plain objects. */
export interface DatabaseInput {
  data?: Record<string, unknown>;
  filter?: Record<string, unknown>;
}

/** What `processor.database.execute` takes. */
export interface ExecuteOptions {
  product: string;
  env: string;
  database: string;
  action: string;
  input?: DatabaseInput;
  session?: SessionLike;
  cache?: string;
  retries?: number;
  version?: number;
  idempotencyKey?: string;
  pageSize?: number;
  pageToken?: string;
}

/** What a database action answered (ExecuteResponse's fields); rows are plain objects keyed by column name. */
export type DatabaseResult = Omit<ExecuteResponse, "rows"> & { rows: Record<string, unknown>[] };

function result(step: StepResult, processId: string, version: number): DatabaseResult {
  return {
    rows: step.rows as Record<string, unknown>[],
    affectedRows: step.affectedRows,
    count: step.count,
    lastInsertId: step.lastInsertId,
    processId,
    cached: false,
    version,
    nextPageToken: "",
  };
}

/** `processor.database`: run a database's actions, one at a time or several in one transaction. */
export class DatabaseClient extends ResourceClient<DatabaseServiceClient> {
  /** Run one action. */
  async execute(request: ExecuteOptions, options?: CallOptions): Promise<DatabaseResult> {
    const response = await this.caller.unary(
      this.stub,
      this.stub.execute,
      ExecuteRequest.fromPartial({ ...request, session: sessionRef(request.session) }),
      options,
    );
    return {
      ...result(response, response.processId, response.version),
      cached: response.cached,
      nextPageToken: response.nextPageToken,
    };
  }

  /** Run `steps` in one transaction; one result per step (all committed), or an error (none). */
  async batch(
    request: {
      product: string;
      env: string;
      database: string;
      steps: { action: string; input?: DatabaseInput; tag?: string }[];
      session?: SessionLike;
      version?: number;
      idempotencyKey?: string;
    },
    options?: CallOptions,
  ): Promise<DatabaseResult[]> {
    const response = await this.caller.unary(
      this.stub,
      this.stub.batch,
      BatchRequest.fromPartial({
        ...request,
        steps: request.steps as Partial<BatchStep>[],
        session: sessionRef(request.session),
      }),
      options,
    );
    return response.results.map((step) => result(step, response.processId, response.version));
  }
}

/** `processor.migration`: apply, roll back, report and plan a database's migrations. */
export class MigrationClient extends ResourceClient<MigrationServiceClient> {
  private static target(t: Partial<MigrationTarget> & { product: string; env: string; database: string }): MigrationTarget {
    return { product: t.product, env: t.env, database: t.database, version: t.version ?? 0 };
  }

  /** Apply the pending migrations (all, or up to and including `tag`). */
  run(
    request: { product: string; env: string; database: string; version?: number; tag?: string },
    options?: CallOptions,
  ): Promise<MigrationServiceRunResponse> {
    return this.caller.unary(this.stub, this.stub.run, { target: MigrationClient.target(request), tag: request.tag ?? "" }, options);
  }

  /** Revert applied migrations, newest first: `steps` of them (default 1), or back to and including `tag`. */
  rollback(
    request: { product: string; env: string; database: string; version?: number; steps?: number; tag?: string },
    options?: CallOptions,
  ): Promise<MigrationServiceRollbackResponse> {
    return this.caller.unary(
      this.stub,
      this.stub.rollback,
      { target: MigrationClient.target(request), steps: request.steps ?? 0, tag: request.tag ?? "" },
      options,
    );
  }

  /** Every migration with its state. */
  status(
    request: { product: string; env: string; database: string; version?: number },
    options?: CallOptions,
  ): Promise<MigrationServiceStatusResponse> {
    return this.caller.unary(this.stub, this.stub.status, { target: MigrationClient.target(request) }, options, true);
  }

  /** The statements `run` (or, with `rollback`, `rollback`) would run. */
  plan(
    request: { product: string; env: string; database: string; version?: number; tag?: string; rollback?: boolean; steps?: number },
    options?: CallOptions,
  ): Promise<MigrationServicePlanResponse> {
    return this.caller.unary(
      this.stub,
      this.stub.plan,
      {
        target: MigrationClient.target(request),
        tag: request.tag ?? "",
        rollback: request.rollback ?? false,
        steps: request.steps ?? 0,
      },
      options,
      true,
    );
  }
}
