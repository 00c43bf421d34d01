"""The aggregator: a gRPC service that issues seeds, rebuilds updates from scalars and paces rounds.

numpy + grpcio only; perturbations are regenerated with :mod:`fwdfleet.perturbation`.
"""
