"""weightcache inference server: wait for the node cache, load weights fast, probe honestly.

The server half of weightcache. It never writes into the node cache (pods mount it read-only) and never
reports ready before the weights are loaded and one warm-up inference ran.
"""

__version__ = "0.1.0"
