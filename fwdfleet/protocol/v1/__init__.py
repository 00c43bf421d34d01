"""Generated stubs of ``proto/fwdfleet/v1/fleet.proto`` (``python scripts/gen_proto.py``; do not edit).

Only :mod:`fwdfleet.protocol.serde` imports them.
"""
