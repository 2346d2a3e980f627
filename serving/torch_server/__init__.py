"""The PyTorch REST server: TF Serving's REST API over the TorchScript export (see docs/rest-server.md)."""
