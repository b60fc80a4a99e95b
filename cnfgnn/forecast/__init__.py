"""Forecasting with a trained run: ``cnfgnn-forecast`` (federated inference, rolling evaluation).

* :mod:`cnfgnn.forecast.request`: the run (config + checkpoint), the data it forecasts from,
  the checks on both, time stamps -> window ends, and the engine that runs the exchange;
* :mod:`cnfgnn.forecast.outputs`: tidy CSV, JSON summaries, per-horizon errors and plots;
* :mod:`cnfgnn.forecast.cli`: the command line.
"""

from cnfgnn._callable import make_callable as _make_callable

_make_callable(__name__, "forecast")  # cnfgnn.forecast(run, at=...) is the API's forecast
