"""Moving bytes: the S3 control and data planes (the only botocore import), listing a model, parts and resume
records, chunk digests where bytes arrive, peers (the wire protocol, the client, the server, the swarm that splits a
file between S3 and peers), and the fetch that makes a model ready through :mod:`agent.store`.

Never imports Kubernetes code (``agent.cluster``, ``kubernetes``) or the daemon's wiring (``agent.daemon``).
"""
