"""The fleet: the device's MQTT client and outbox, and the controller with its store.

The runtime never imports this package; :mod:`edge_runtime.cli` plugs a
:class:`~edge_runtime.fleet.client.FleetClient` into a runtime as an event sink and a command
source. paho-mqtt is imported only here.
"""
