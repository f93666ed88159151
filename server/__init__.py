"""edgefl's aggregation server (import package ``edgefl_server``; install with ``edgefl[server]``).

It announces rounds over MQTT, ingests device updates durably, aggregates them with a strategy
(:mod:`edgefl_server.strategies`) and publishes each new global model.
"""
