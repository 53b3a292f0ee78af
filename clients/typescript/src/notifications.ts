/** Notifications: `processor.notification.send` renders a message's templates and sends it on each channel given. */
import { sessionRef, ResourceClient, type CallOptions, type SessionLike } from "./call.js";
import {
  Channel,
  NotificationServiceClient,
  SendRequest,
  type CallbackInput,
  type ChannelResult as ProtoChannelResult,
  type EmailInput,
  type PushInput,
  type SmsInput,
} from "./gen/ductape/processor/v1/notification.js";

type Input<T> = { [K in keyof T]?: T[K] extends Array<infer U> ? Partial<U>[] : T[K] };

/** What `processor.notification.send` takes; `variables` and `data` are plain objects. */
export interface SendOptions {
  product: string;
  env: string;
  /** `notification_tag:message_tag`. */
  event: string;
  email?: Input<EmailInput>;
  push?: Input<PushInput>;
  sms?: Input<SmsInput>;
  callback?: Input<CallbackInput>;
  session?: SessionLike;
  retries?: number;
  idempotencyKey?: string;
  version?: number;
}

/** One channel's outcome (the proto's ChannelResult, with the channel by name). */
export type ChannelResult = Omit<ProtoChannelResult, "channel"> & { channel: "email" | "push" | "sms" | "callback" | "" };

/** What `send` answered: one result per channel given. */
export interface SendResult {
  results: ChannelResult[];
  processId: string;
  version: number;
}

const NAMES: Partial<Record<Channel, ChannelResult["channel"]>> = {
  [Channel.CHANNEL_EMAIL]: "email",
  [Channel.CHANNEL_PUSH]: "push",
  [Channel.CHANNEL_SMS]: "sms",
  [Channel.CHANNEL_CALLBACK]: "callback",
};

/** `processor.notification`: send a notification's messages. */
export class NotificationClient extends ResourceClient<NotificationServiceClient> {
  /** Send the message `event` (`notification:message`) on each channel given. */
  async send(request: SendOptions, options?: CallOptions): Promise<SendResult> {
    const response = await this.caller.unary(
      this.stub,
      this.stub.send,
      SendRequest.fromPartial({ ...request, session: sessionRef(request.session) }),
      options,
    );
    return {
      results: response.results.map((r) => ({ ...r, channel: NAMES[r.channel] ?? "" })),
      processId: response.processId,
      version: response.version,
    };
  }
}
