"""Client package for the MNIST serving stack (REST and gRPC), with its load tester."""

__version__ = "0.1.0"
