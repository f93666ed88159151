"""A whole federation on one machine (tools layer): the evaluation task's data
(:mod:`~edgefl.simulation.datasets`), what a run trains (:mod:`~edgefl.simulation.task`: digits
or the user's own model and data), the devices (:mod:`~edgefl.simulation.fleet`,
:mod:`~edgefl.simulation.device_process`, :mod:`~edgefl.simulation.load`), the run
(:mod:`~edgefl.simulation.federation`), its baselines and report.
"""
