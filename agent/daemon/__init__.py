"""The daemon: desired state from pod demands (the reconcile loop), the pinned set, the HTTP surfaces (status,
metrics, the control socket), peer exchange wiring, and ``run`` that starts them all and shuts them down cleanly.

The one layer that may import all the others.
"""
