"""gamguard runtime: decoding, engines, guard, gRPC serving and CLI. Never imports torch."""
