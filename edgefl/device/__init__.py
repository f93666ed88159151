"""The device runtime: live predictions (:mod:`~edgefl.device.predictor`), local training
(:mod:`~edgefl.device.trainer`), privacy and compression of updates, the on-disk outbox, and the
client that ties them to the server (:mod:`~edgefl.device.client`).

It imports the kernels, the wire format and the transport, never the server or the tools
(``tests/test_layers.py``).
"""
