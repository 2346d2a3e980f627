"""Generated protobuf modules for the stand-in (see config.proto)."""
