"""The Kubernetes side: the pods watch, pod conditions and Events, the node's labels and startup taint, the policy
(who may use which model, the warm set) and the pods-file stand-in. ``kube.py`` is the only ``kubernetes`` import.

Never imports S3 or peer code (``agent.transfer``, botocore) nor the daemon (``agent.daemon``).
"""
