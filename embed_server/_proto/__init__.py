"""Generated protobuf / gRPC code (protos/generate.sh); do not edit."""
