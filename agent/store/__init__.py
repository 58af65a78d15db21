"""The node's cache on disk: its layout (the one module the server reads), locks, manifests, building and publishing
a revision (the pointer swap is the only commit point), eviction and maintenance.

Testable with no network: it never imports S3, peer or Kubernetes code (``agent.transfer``, ``agent.cluster``,
``agent.daemon``, botocore, aiohttp, kubernetes) — checked by the import-linter contract in ``pyproject.toml``.
Empty on purpose: importing ``agent.store.layout`` must not pull in the rest.
"""
