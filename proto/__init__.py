"""Generated protobuf and gRPC modules for the Open Inference Protocol (see *.proto)."""
