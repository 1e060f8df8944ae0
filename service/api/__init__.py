"""The gRPC edge: servicer (protobuf <-> domain), server wiring, security, metrics and logs."""
