#!/usr/bin/env bash
# Build the Java or Go smoke caller from the protos alone, with the toolchains Debian packages:
#   clients/smoke/build.sh java OUT   -> OUT/classes (run: java -cp "$(cat OUT/classpath)" Smoke ADDRESS)
#   clients/smoke/build.sh go OUT     -> OUT/smoke   (run: OUT/smoke ADDRESS)
# Java: protobuf-compiler, protobuf-compiler-grpc-java-plugin, libgrpc-java, libprotobuf-java, libnetty-java,
# libperfmark-java, libgeronimo-annotation-1.3-spec-java and a JDK. Go: golang-go, protoc-gen-go, protoc-gen-go-grpc,
# golang-google-grpc-dev, golang-google-protobuf-dev (GOPATH mode on /usr/share/gocode: nothing is downloaded).
set -euo pipefail
language=$1
out=$(mkdir -p "$2" && cd "$2" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
protos=$(cd "$root" && find protos -name '*.proto' | sort)
cd "$root"
case "$language" in
  java)
    mkdir -p "$out/gen" "$out/classes"
    protoc -I protos -I third_party/googleapis --java_out="$out/gen" \
      --plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin --grpc-java_out="$out/gen" \
      $protos third_party/googleapis/google/rpc/*.proto
    jars=""
    for jar in protobuf grpc-api grpc-context grpc-core grpc-stub grpc-protobuf grpc-protobuf-lite grpc-netty guava \
      failureaccess jsr305 error_prone_annotations perfmark-api geronimo-annotation-1.3-spec netty-common netty-buffer \
      netty-transport netty-resolver netty-codec netty-codec-http netty-codec-http2 netty-codec-socks netty-handler \
      netty-handler-proxy; do
      if [ -f "/usr/share/java/$jar.jar" ]; then jars="$jars/usr/share/java/$jar.jar:"; fi
    done
    echo "$jars$out/classes" >"$out/classpath"
    javac -nowarn -encoding UTF-8 -d "$out/classes" -cp "$jars" $(find "$out/gen" -name '*.java') "$here/java/Smoke.java"
    ;;
  go)
    gopath="$out/gopath"
    mkdir -p "$gopath/src/smoke"
    protoc -I protos --go_out="$gopath/src" --go-grpc_out="$gopath/src" $protos
    cp "$here/go/main.go" "$gopath/src/smoke/main.go"
    (cd "$gopath/src/smoke" && GO111MODULE=off GOFLAGS= GOPATH="$gopath:/usr/share/gocode" GOCACHE="$out/gocache" \
      go build -o "$out/smoke" .)
    ;;
  *)
    echo "usage: $0 java|go OUT" >&2
    exit 2
    ;;
esac
