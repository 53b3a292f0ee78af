// A Java caller of the processor, written from the protos alone: generated with protoc and grpc-java's plugin, run
// against a processor serving examples/shop.yaml. It prints one line per check; tests/test_polyglot_smoke.py runs it.
//
//   run <status_code> <body.id>                  ActionService.Run with Struct input
//   message <data> <delivery_attempt>            BrokerService.Subscribe (init, ready, batch, ack, half-close)
//   error <code> <reason> <metadata.product>     ProductService.Get of a missing product, details decoded

import com.google.protobuf.Any;
import com.google.protobuf.Struct;
import com.google.protobuf.Value;
import com.google.rpc.ErrorInfo;
import dev.ductape.processor.v1.Acknowledge;
import dev.ductape.processor.v1.ActionInput;
import dev.ductape.processor.v1.ActionServiceGrpc;
import dev.ductape.processor.v1.BrokerServiceGrpc;
import dev.ductape.processor.v1.GetRequest;
import dev.ductape.processor.v1.OutgoingMessage;
import dev.ductape.processor.v1.ProductServiceGrpc;
import dev.ductape.processor.v1.PublishRequest;
import dev.ductape.processor.v1.ReceivedMessage;
import dev.ductape.processor.v1.RunRequest;
import dev.ductape.processor.v1.RunResponse;
import dev.ductape.processor.v1.SubscribeInit;
import dev.ductape.processor.v1.SubscribeRequest;
import dev.ductape.processor.v1.SubscribeResponse;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.StreamObserver;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

public final class Smoke {
  private static Value text(String value) {
    return Value.newBuilder().setStringValue(value).build();
  }

  private static Struct struct(String... pairs) {
    Struct.Builder struct = Struct.newBuilder();
    for (int i = 0; i < pairs.length; i += 2) {
      struct.putFields(pairs[i], text(pairs[i + 1]));
    }
    return struct.build();
  }

  public static void main(String[] args) throws Exception {
    ManagedChannel channel = ManagedChannelBuilder.forTarget(args[0]).usePlaintext().build();
    try {
      run(channel);
      subscribe(channel);
      error(channel);
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }

  private static void run(ManagedChannel channel) {
    RunRequest request = RunRequest.newBuilder()
        .setProduct("shop").setEnv("dev").setApp("mailer").setEvent("send_welcome")
        .setInput(ActionInput.newBuilder()
            .setParams(struct("template", "welcome"))
            .setBody(struct("email", "ada@example.com", "userId", "u-1")))
        .build();
    RunResponse response =
        ActionServiceGrpc.newBlockingStub(channel).withDeadlineAfter(10, TimeUnit.SECONDS).run(request);
    String id = response.getJson().getStructValue().getFieldsOrThrow("id").getStringValue();
    System.out.println("run " + response.getStatusCode() + " " + id);
  }

  private static void subscribe(ManagedChannel channel) throws Exception {
    LinkedBlockingQueue<SubscribeResponse> responses = new LinkedBlockingQueue<>();
    CompletableFuture<Void> ended = new CompletableFuture<>();
    StreamObserver<SubscribeRequest> requests = BrokerServiceGrpc.newStub(channel).subscribe(
        new StreamObserver<SubscribeResponse>() {
          @Override public void onNext(SubscribeResponse response) { responses.add(response); }
          @Override public void onError(Throwable error) { ended.completeExceptionally(error); }
          @Override public void onCompleted() { ended.complete(null); }
        });
    requests.onNext(SubscribeRequest.newBuilder().setInit(SubscribeInit.newBuilder()
        .setProduct("shop").setEnv("dev").setEvent("events:user-created").setGroup("smoke-java")).build());
    SubscribeResponse first = responses.poll(10, TimeUnit.SECONDS);
    if (first == null || !first.hasReady()) throw new IllegalStateException("no ready: " + first);
    BrokerServiceGrpc.newBlockingStub(channel).withDeadlineAfter(10, TimeUnit.SECONDS).publish(
        PublishRequest.newBuilder().setProduct("shop").setEnv("dev").setEvent("events:user-created")
            .setMessage(OutgoingMessage.newBuilder()
                .setJson(Value.newBuilder().setStructValue(struct("userId", "u-1"))))
            .build());
    SubscribeResponse batch = responses.poll(10, TimeUnit.SECONDS);
    if (batch == null || !batch.hasBatch()) throw new IllegalStateException("no batch: " + batch);
    ReceivedMessage message = batch.getBatch().getMessages(0);
    System.out.println("message " + message.getData().toString(StandardCharsets.UTF_8) + " "
        + message.getDeliveryAttempt());
    requests.onNext(SubscribeRequest.newBuilder()
        .setAck(Acknowledge.newBuilder().addAckIds(message.getAckId())).build());
    requests.onCompleted();  // half-close: the server reads the ack, then ends the stream with OK
    ended.get(10, TimeUnit.SECONDS);
  }

  private static void error(ManagedChannel channel) throws Exception {
    try {
      ProductServiceGrpc.newBlockingStub(channel).withDeadlineAfter(10, TimeUnit.SECONDS)
          .get(GetRequest.newBuilder().setProduct("blog").build());
      throw new IllegalStateException("a missing product was found");
    } catch (StatusRuntimeException failure) {
      com.google.rpc.Status status = StatusProto.fromThrowable(failure);
      for (Any detail : status.getDetailsList()) {
        if (detail.is(ErrorInfo.class)) {
          ErrorInfo info = detail.unpack(ErrorInfo.class);
          System.out.println("error " + failure.getStatus().getCode() + " " + info.getReason() + " "
              + info.getMetadataOrThrow("product"));
        }
      }
    }
  }
}
