"""convserve.client: a light client for convserve and any Open Inference Protocol server."""
