"""overlaycni: an overlay pod network for Kubernetes-style clusters on Linux."""

__version__ = "0.1.0"
