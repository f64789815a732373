"""Long time-series forecasting (CAB's LSTF task): Informer on ETT, ECL and Weather.

Modules: ``task`` (the spec and stages), ``data`` (CSV reading, windows, fetchers), ``model``
(Informer), ``metrics`` (MSE, MAE, persistence, the figure). Nothing is imported here, so that
listing tasks stays cheap.
"""
