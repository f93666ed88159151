"""How a device and the server reach each other: MQTT v5 over paho (:mod:`edgefl.transport.mqtt`).

Below the device runtime and the server, above the wire format (``tests/test_layers.py``).
"""
