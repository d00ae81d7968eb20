"""What a tool run needs around the packages: config validation, the composed workflow, logging,
measurement, reports and tables.

`models/`, `data/`, `distill/` and `qat/` know nothing of runs; this package composes them
(`distill/` and `qat/` never import each other, so the wiring lives here) and `tools/` are thin
scripts over it. Nothing below `runtime/` imports it.
"""
