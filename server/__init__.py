"""convserve.server: the gRPC inference server (Open Inference Protocol / Triton).

Modules: `config` (options, CONVSERVE_* variables), `repository` (models and versions),
`batcher` (dynamic batching over NumPy arrays and futures), `protocol` (protobuf <-> NumPy),
`servicer` (thin grpc.aio servicer), `metrics` (Prometheus), `app` (wiring, lifecycle, drain),
`cli` (`convserve serve`).
"""
