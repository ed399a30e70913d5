"""The RPC edge: the .proto contract and its build, conversion to and from protobuf, the proxy glue, message limits, pagination, streaming deltas and the client example."""
