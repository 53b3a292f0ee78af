// A Go caller of the processor, written from the protos alone: generated with protoc-gen-go and protoc-gen-go-grpc,
// run against a processor serving examples/shop.yaml. It prints one line per check; tests/test_polyglot_smoke.py
// runs it.
//
//	run <status_code> <body.id>                  ActionService.Run with Struct input
//	message <data> <delivery_attempt>            BrokerService.Subscribe (init, ready, batch, ack, half-close)
//	error <code> <reason> <metadata.product>     ProductService.Get of a missing product, details decoded
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	pb "processor.ductape.dev/gen/go/ductape/processor/v1"
)

func check(err error, what string) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
		os.Exit(1)
	}
}

func fields(values map[string]interface{}) *structpb.Struct {
	s, err := structpb.NewStruct(values)
	check(err, "struct")
	return s
}

func main() {
	conn, err := grpc.Dial(os.Args[1], grpc.WithInsecure())
	check(err, "dial")
	defer conn.Close()
	run(conn)
	subscribe(conn)
	missing(conn)
}

func run(conn *grpc.ClientConn) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	response, err := pb.NewActionServiceClient(conn).Run(ctx, &pb.RunRequest{
		Product: "shop", Env: "dev", App: "mailer", Event: "send_welcome",
		Input: &pb.ActionInput{
			Params: fields(map[string]interface{}{"template": "welcome"}),
			Body:   fields(map[string]interface{}{"email": "ada@example.com", "userId": "u-1"}),
		},
	})
	check(err, "run")
	fmt.Println("run", response.GetStatusCode(), response.GetJson().GetStructValue().AsMap()["id"])
}

func subscribe(conn *grpc.ClientConn) {
	ctx, cancel := context.WithCancel(context.Background()) // no deadline: a Subscribe lives until closed
	defer cancel()
	stream, err := pb.NewBrokerServiceClient(conn).Subscribe(ctx)
	check(err, "subscribe")
	check(stream.Send(&pb.SubscribeRequest{Kind: &pb.SubscribeRequest_Init{Init: &pb.SubscribeInit{
		Product: "shop", Env: "dev", Event: "events:user-created", Group: "smoke-go",
	}}}), "init")
	first, err := stream.Recv()
	check(err, "ready")
	if first.GetReady() == nil {
		check(fmt.Errorf("%v", first), "ready")
	}
	publishCtx, done := context.WithTimeout(context.Background(), 10*time.Second)
	defer done()
	payload, err := structpb.NewValue(map[string]interface{}{"userId": "u-1"})
	check(err, "payload")
	_, err = pb.NewBrokerServiceClient(conn).Publish(publishCtx, &pb.PublishRequest{
		Product: "shop", Env: "dev", Event: "events:user-created",
		Message: &pb.OutgoingMessage{Payload: &pb.OutgoingMessage_Json{Json: payload}},
	})
	check(err, "publish")
	batch, err := stream.Recv()
	check(err, "batch")
	message := batch.GetBatch().GetMessages()[0]
	fmt.Println("message", string(message.GetData()), message.GetDeliveryAttempt())
	check(stream.Send(&pb.SubscribeRequest{Kind: &pb.SubscribeRequest_Ack{
		Ack: &pb.Acknowledge{AckIds: []string{message.GetAckId()}},
	}}), "ack")
	check(stream.CloseSend(), "half-close") // the server reads the ack, then ends the stream with OK
	if _, err := stream.Recv(); err != io.EOF {
		check(fmt.Errorf("the stream ended with %v, not OK", err), "close")
	}
}

func missing(conn *grpc.ClientConn) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := pb.NewProductServiceClient(conn).Get(ctx, &pb.GetRequest{Product: "blog"})
	failure, _ := status.FromError(err)
	for _, detail := range failure.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			fmt.Println("error", failure.Code(), info.GetReason(), info.GetMetadata()["product"])
		}
	}
}
