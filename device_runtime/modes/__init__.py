"""The device halves of the upload modes, one module per mode (``scalar``, ``dense``, ``fedavg``, ...).

Each module holds ``MODE``, an object with ``name``, ``carries``, ``check(worker)`` and
``compute(worker, task, data) -> Upload`` (:class:`fwdfleet.device_runtime.worker.DeviceMode`);
:func:`fwdfleet.device_runtime.worker.device_mode` finds it by name. The server halves live in
:mod:`fwdfleet.aggregator.modes`; the two sides share only :mod:`fwdfleet.modes` and the task types.
"""
