/**
 * Typed errors for failed calls, with the processor's rich error details decoded from the
 * `grpc-status-details-bin` trailer (a `google.rpc.Status` holding an `ErrorInfo`, a `BadRequest`, a `RetryInfo`).
 */
import { Metadata, status as Status, type ServiceError } from "@grpc/grpc-js";
import { BadRequest, ErrorInfo, RetryInfo } from "./gen/google/rpc/error_details.js";
import { Status as RpcStatus } from "./gen/google/rpc/status.js";

export const STATUS_DETAILS_KEY = "grpc-status-details-bin";
const TYPE_PREFIX = "type.googleapis.com/";

/** One bad field: its path (`input.body.email`, `apps[0].actions[2].path`) and why. */
export interface FieldViolation {
  field: string;
  description: string;
}

/** What a failed call carries besides its code and message. */
export interface ErrorDetails {
  reason?: string;
  domain?: string;
  metadata?: Record<string, string>;
  fieldViolations?: FieldViolation[];
  requestId?: string;
  retryAfterMs?: number;
}

/** A call to the processor failed. `code` is the gRPC status code (`status.NOT_FOUND`, ...). */
export class ProcessorError extends Error {
  /** The gRPC status code's name: `NOT_FOUND`, `INVALID_ARGUMENT`, ... */
  readonly codeName: string;
  /** The UPPER_SNAKE reason of the ErrorInfo (`PRODUCT_NOT_FOUND`); empty when the server sent none. */
  readonly reason: string;
  /** The ErrorInfo's domain (`processor.ductape.dev`). */
  readonly domain: string;
  /** The ErrorInfo's metadata: the resource involved (`product`, `env`, ...). */
  readonly metadata: Record<string, string>;
  /** The BadRequest's field violations, one per bad field. */
  readonly fieldViolations: FieldViolation[];
  /** The request id the server logged the call under (`x-request-id` trailer). */
  readonly requestId: string;
  /** How long to wait before a retry may succeed (RetryInfo), in milliseconds; undefined when not said. */
  readonly retryAfterMs: number | undefined;

  constructor(
    readonly code: Status,
    readonly details: string,
    extra: ErrorDetails = {},
  ) {
    const codeName = Status[code] ?? String(code);
    super(`${codeName}: ${extra.reason ? `${extra.reason}: ` : ""}${details}`);
    this.name = new.target.name;
    this.codeName = codeName;
    this.reason = extra.reason ?? "";
    this.domain = extra.domain ?? "";
    this.metadata = extra.metadata ?? {};
    this.fieldViolations = extra.fieldViolations ?? [];
    this.requestId = extra.requestId ?? "";
    this.retryAfterMs = extra.retryAfterMs;
  }
}

/** INVALID_ARGUMENT: the request (or the manifest in it) is wrong; see `fieldViolations`. */
export class InvalidArgumentError extends ProcessorError {}
/** NOT_FOUND: the product, environment, version or resource does not exist. */
export class NotFoundError extends ProcessorError {}
/** ALREADY_EXISTS. */
export class AlreadyExistsError extends ProcessorError {}
/** FAILED_PRECONDITION: the system is not in the state the call needs. */
export class FailedPreconditionError extends ProcessorError {}
/** UNAUTHENTICATED: missing or wrong API key, or an invalid session. */
export class UnauthenticatedError extends ProcessorError {}
/** PERMISSION_DENIED. */
export class PermissionDeniedError extends ProcessorError {}
/** RESOURCE_EXHAUSTED: a size or rate limit was hit. */
export class ResourceExhaustedError extends ProcessorError {}
/** UNAVAILABLE: try again, possibly on another replica. */
export class UnavailableError extends ProcessorError {}
/** DEADLINE_EXCEEDED. */
export class DeadlineExceededError extends ProcessorError {}
/** ABORTED: a concurrent call won (`REFRESH_CONFLICT`). */
export class AbortedError extends ProcessorError {}
/** OUT_OF_RANGE (`RANGE_NOT_SATISFIABLE`). */
export class OutOfRangeError extends ProcessorError {}
/** CANCELLED: the call was cancelled (by this client). */
export class CancelledError extends ProcessorError {}
/** INTERNAL: the server failed; `metadata.correlation_id` finds it in the server's log. */
export class InternalError extends ProcessorError {}

const BY_CODE: Partial<Record<Status, typeof ProcessorError>> = {
  [Status.INVALID_ARGUMENT]: InvalidArgumentError,
  [Status.NOT_FOUND]: NotFoundError,
  [Status.ALREADY_EXISTS]: AlreadyExistsError,
  [Status.FAILED_PRECONDITION]: FailedPreconditionError,
  [Status.UNAUTHENTICATED]: UnauthenticatedError,
  [Status.PERMISSION_DENIED]: PermissionDeniedError,
  [Status.RESOURCE_EXHAUSTED]: ResourceExhaustedError,
  [Status.UNAVAILABLE]: UnavailableError,
  [Status.DEADLINE_EXCEEDED]: DeadlineExceededError,
  [Status.ABORTED]: AbortedError,
  [Status.OUT_OF_RANGE]: OutOfRangeError,
  [Status.CANCELLED]: CancelledError,
  [Status.INTERNAL]: InternalError,
};

/** The rich details of a `grpc-status-details-bin` value (a serialized `google.rpc.Status`). */
export function decodeStatusDetails(bytes: Uint8Array): ErrorDetails {
  const details: ErrorDetails = {};
  for (const any of RpcStatus.decode(bytes).details) {
    const type = any.typeUrl.startsWith(TYPE_PREFIX) ? any.typeUrl.slice(TYPE_PREFIX.length) : any.typeUrl;
    if (type === "google.rpc.ErrorInfo") {
      const info = ErrorInfo.decode(any.value);
      details.reason = info.reason;
      details.domain = info.domain;
      details.metadata = info.metadata;
    } else if (type === "google.rpc.BadRequest") {
      const bad = BadRequest.decode(any.value);
      details.fieldViolations = [
        ...(details.fieldViolations ?? []),
        ...bad.fieldViolations.map((v) => ({ field: v.field, description: v.description })),
      ];
    } else if (type === "google.rpc.RetryInfo") {
      const delay = RetryInfo.decode(any.value).retryDelay;
      if (delay) details.retryAfterMs = delay.seconds * 1000 + delay.nanos / 1e6;
    }
  }
  return details;
}

/** The typed error for a failed gRPC call, with its rich details decoded. */
export function fromServiceError(error: Partial<ServiceError>): ProcessorError {
  const code = (error.code ?? Status.UNKNOWN) as Status;
  let details: ErrorDetails = {};
  const trailers = error.metadata instanceof Metadata ? error.metadata : undefined;
  const raw = trailers?.get(STATUS_DETAILS_KEY)[0];
  if (raw instanceof Uint8Array) {
    try {
      details = decodeStatusDetails(raw);
    } catch {
      // not a google.rpc.Status: keep the code and message
    }
  }
  const requestId = trailers?.get("x-request-id")[0];
  if (typeof requestId === "string") details.requestId = requestId;
  const Class = BY_CODE[code] ?? ProcessorError;
  return new Class(code, error.details ?? error.message ?? "", details);
}
