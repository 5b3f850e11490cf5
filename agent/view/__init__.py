"""The operator's live page (``stemagent run --view``, ``stemagent view LOG``).

- :mod:`~stemagent.agent.view.server`: the aiohttp app on the agent's own event loop, the token
  and the control route (the same validated path as MQTT);
- :mod:`~stemagent.agent.view.live`: what a running agent shows, taken lazily off its loop;
- :mod:`~stemagent.agent.view.replay`: a run log stepped through observation by observation;
- :mod:`~stemagent.agent.view.snapshot`: the page's document (downsampled frame, atoms, command);
- ``static/``: the page itself (plain HTML, JavaScript and a canvas; no build step).
"""
