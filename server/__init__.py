"""convserve.server: the gRPC inference server (Open Inference Protocol)."""
