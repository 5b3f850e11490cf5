"""The wiring room: the ``stemagent`` command line and construction of a run from its config.

The only subpackage that knows every other room (core, simulators, drivers, the agent); nothing
outside it imports it. ``stemagent.agent.app.cli:app`` is the console script.
"""
