"""Generated protobuf and gRPC code for `proto/qzoom/v1/` (regenerate with `python -m qzoom_service.protogen`;
never edit by hand). Import from `qzoom_service._proto.qzoom.v1`; nothing is re-exported here."""
