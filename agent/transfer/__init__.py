"""Moving bytes: the S3 control and data planes (the only botocore import), listing a model, parts and resume
records, chunk digests where bytes arrive, peers (the wire protocol, the client, the server, the swarm that splits a
file between S3 and peers), and the fetch that makes a model ready through :mod:`agent.store`.

Never imports Kubernetes code (``agent.cluster``, ``kubernetes``) or the daemon's wiring (``agent.daemon``).
"""

import sys

# botocore imports awscrt whenever it is installed (40-70 ms of every start-up, before the first byte of a
# `prefetch`) and would then use it only for what the agent never asks of it: SigV4a and CRC32C/CRC64 checksums
# (the agent signs SigV4 and checks xxh3 digests). A process that loaded awscrt already keeps it.
sys.modules.setdefault("awscrt", None)  # type: ignore[arg-type]
