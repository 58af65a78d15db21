"""What the agent and the server share: size units, JSON logging, settings loading (stdlib only).

Both ``agent`` and ``server`` import this package; it must never import either of them (nor anything outside the
standard library), so the server can use it without pulling in agent code and the agent image stays small.
"""
