"""A real gRPC peer (Python grpcio) for the proxy's tests.

server NAME MODE: serves on 127.0.0.1 (a free port, printed as "port N")
the unary method /test.Echo/Call and the server-streaming method
/test.Echo/Stream, both answering NAME as their message. MODE ok succeeds;
unavailable fails every call with UNAVAILABLE at once (a trailers-only
response); late-unavailable sends the message first and then fails with
UNAVAILABLE (the status in trailers after the data). Prints "hit" for
every call. Generic handlers with identity (de)serializers: no protoc
code generation.

client TARGET METHOD CALLS CONCURRENCY: makes CALLS calls of METHOD (Call
or Stream) through an h2c channel (prior knowledge, as every grpcio
client does without TLS) with CONCURRENCY in flight, and prints one JSON
object: the answers counted by server name and the failures by status.
"""

import json
import sys
import threading
from concurrent import futures

try:
    import grpc
except ImportError:
    sys.stderr.write("{} cannot import grpc\n".format(sys.executable))
    sys.exit(97)

SERVICE = "test.Echo"
# No HTTP proxy from the environment, and no client-side retries: every
# failure the client sees is one the mesh proxy let through.
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
LOCK = threading.Lock()


def say(line):
    with LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def serve(name, mode):
    def call(request, context):
        say("hit")
        if mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, name + " is unavailable")
        return name.encode()

    def stream(request, context):
        say("hit")
        if mode == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, name + " is unavailable")
        yield name.encode()
        if mode == "late-unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, name + " failed late")

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Call": grpc.unary_unary_rpc_method_handler(call),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    say("port %d" % port)
    server.wait_for_termination()


def client(target, method, calls, concurrency):
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=10)
    path = "/%s/%s" % (SERVICE, method)
    if method == "Stream":
        stub = channel.unary_stream(path)

        def one():
            return list(stub(b"ping", timeout=10))[0]

    else:
        stub = channel.unary_unary(path)

        def one():
            return stub(b"ping", timeout=10)

    answered, failed, details = {}, {}, []

    def run():
        try:
            name = one().decode()
            with LOCK:
                answered[name] = answered.get(name, 0) + 1
        except grpc.RpcError as err:
            code = err.code().name
            with LOCK:
                failed[code] = failed.get(code, 0) + 1
                if len(details) < 5:
                    details.append("%s: %s" % (code, err.details()))

    with futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        for done in [pool.submit(run) for _ in range(calls)]:
            done.result()
    channel.close()
    say(json.dumps({"answered": answered, "failed": failed, "details": details}))


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2], sys.argv[3])
    else:
        client(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
