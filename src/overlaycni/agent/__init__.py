"""The node agent: registers the node, keeps its peers programmed from the
datastore (reconcile, do not replay) and serves the CNI plugin."""
