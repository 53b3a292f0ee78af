/** The Ductape processor's TypeScript client. See README.md; the protocol of Subscribe is docs/streaming.md. */
export { Processor, ActionClient, SessionClient, ProductClient, LogClient } from "./client.js";
export type {
  ProcessorOptions,
  ActionInput,
  RunActionRequest,
  ActionResult,
  Session,
  ListExecutionsRequest,
  ManifestSource,
} from "./client.js";
export { BrokerClient, Subscription, StreamItem, Message, outgoing } from "./brokers.js";
export type { MessageFields, PublishResult, SubscribeOptions, StreamOptions } from "./brokers.js";
export { WebhookClient, ReceivedWebhook } from "./webhooks.js";
export type { Delivery, StoredWebhook, ReceiveOptions } from "./webhooks.js";
export { DatabaseClient, MigrationClient } from "./databases.js";
export type { DatabaseInput, DatabaseResult, ExecuteOptions } from "./databases.js";
export { StorageClient } from "./storage.js";
export type { StorageAddress, FileContent } from "./storage.js";
export { NotificationClient } from "./notifications.js";
export { JobClient } from "./jobs.js";
export { FeatureClient } from "./features.js";
export type { FeatureCall, FeatureEvent, FeatureRun, FeatureStep, RunAddress, RunFeatureOptions } from "./features.js";
export type { JobAddress, ScheduleOptions, ScheduledJob, Job, JobRun } from "./jobs.js";
export type { SendOptions, SendResult, ChannelResult } from "./notifications.js";
export { duration } from "./call.js";
export type { CallOptions, CallMetadata, SessionLike } from "./call.js";
export {
  ProcessorError,
  InvalidArgumentError,
  NotFoundError,
  AlreadyExistsError,
  FailedPreconditionError,
  UnauthenticatedError,
  PermissionDeniedError,
  ResourceExhaustedError,
  UnavailableError,
  DeadlineExceededError,
  AbortedError,
  OutOfRangeError,
  CancelledError,
  InternalError,
  decodeStatusDetails,
  fromServiceError,
  STATUS_DETAILS_KEY,
} from "./errors.js";
export type { FieldViolation, ErrorDetails } from "./errors.js";
export { status } from "@grpc/grpc-js";
