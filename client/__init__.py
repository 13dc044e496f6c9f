"""gRPC client library: batching, deadlines, retries, typed errors."""
