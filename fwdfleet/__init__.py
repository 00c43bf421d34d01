"""fwdfleet: backpropagation-free federated on-device training.

Shared, torch-free pieces live here: the bundle contract (:mod:`fwdfleet.bundle`), the error
types (:mod:`fwdfleet.errors`), the wire protocol stubs and the ``fwdfleet`` command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fwdfleet")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
