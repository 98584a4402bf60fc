"""`python -m qywx_ray.testing.wecomsim`: the simulator as an HTTP server (see cli.py)."""

from qywx_ray.testing.wecomsim.cli import main

main()
