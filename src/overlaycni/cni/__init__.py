"""The CNI plugin: a stdlib-only shim (``shim.py``) that forwards to the
agent, the pure request/result model (``protocol.py``) and ``install-cni``."""
