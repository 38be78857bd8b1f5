"""Benchmarks for vhost-user-balloon: each figure beside a baseline from the same run.

One module per benchmark, each with a ``run(options)`` that prints its figures and
returns them; ``python -m benchmarks`` picks them (see ``__main__``). The daemon runs
as its own process (the installed command) and the Python frontend from
tests/frontend.py plays QEMU. Results and how to read them: BENCHMARKS.md.
"""
