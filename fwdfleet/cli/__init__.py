"""The ``fwdfleet`` command line: one module per role, thin shells over library functions."""
