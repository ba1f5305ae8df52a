"""Protocol buffers for gamguard.v1.Guard and the Open Inference Protocol v2 (generated stubs)."""
