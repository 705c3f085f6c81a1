"""Transport adapters: the only modules that import gRPC or protobuf."""
