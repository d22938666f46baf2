"""The side-by-side benchmark behind ``make bench``: herder and Procrastinate on one
PostgreSQL, each worker in its own process, timed with the database's own timestamps.

``python -m bench --help`` lists the options; results go to ``bench/results.json``.
"""
