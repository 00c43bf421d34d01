"""Pipeline Forward-Forward (Aktemur et al., arXiv 2404.08573): an FF-MLP's layers trained in parallel
by node processes that exchange layer parameters through a gRPC parameter store.

Read in the order the data flows:

* :mod:`pff.schedule`: chapters, which node trains which layer when, dependencies, simulation;
* :mod:`pff.config`: the run's settings (``plan.json``) and each node's data (shards);
* :mod:`pff.chapter`: one task: a layer's input from the layers below, negatives, E/S epochs of steps;
* :mod:`pff.wire`, :mod:`pff.store`: the parameter store (on disk, over gRPC);
* :mod:`pff.node`: a node process; :mod:`pff.run`: the coordinator; :mod:`pff.evaluate`: prediction;
* :mod:`pff.plot`: the timeline figure. Command line: ``fwdfleet pff run``.
"""
