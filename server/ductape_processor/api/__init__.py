"""One servicer module per proto service (proto in, domain call, proto out) and the one interceptor."""
