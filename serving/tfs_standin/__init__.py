"""A development stand-in for TensorFlow Serving's gRPC and REST APIs (not for production).

Serves SavedModels from TF Serving's model base path layout with the same
services, status codes and command-line flags as ``tensorflow_model_server``,
so that local runs and tests need neither the ``tensorflow/serving`` image nor
its binary. Production runs the real image (Dockerfile.tf, docker-compose.yml).
See docs/tf-serving.md.
"""
