"""The ``edgefl`` command (tools layer): :mod:`~edgefl.cli.main` dispatches to one module per
subcommand (:mod:`~edgefl.cli.client`, :mod:`~edgefl.cli.server`, :mod:`~edgefl.cli.simulate`,
:mod:`~edgefl.cli.bench`); :mod:`~edgefl.cli.options` holds the option helpers they share.
"""
