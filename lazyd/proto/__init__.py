"""Our own .proto definitions of containerd 1.6's API and their generated stubs.

Same packages, services, messages and field numbers as containerd, so the wire format
matches.  Regenerate with ``python3 scripts/gen_protos.py`` (``--check`` verifies).
"""
