"""weightcache agent: the node-local S3 model-weight cache (DaemonSet side).

Never imports torch: the agent image must stay small.
"""

__version__ = "0.1.0"
