"""Engine worker processes: the model runs in supervised child processes, one per device or
share of the CPU; the server process keeps gRPC, validation, the queue and delivery."""
