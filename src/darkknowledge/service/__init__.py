"""The job service (``dk serve``): HTTP API, database, workers and dashboard.

It imports the core and calls the same ``run_recipe`` as ``dk run``; the core never
imports it. Needs the ``service`` extra (``pip install 'darkknowledge[service]'``).
"""
