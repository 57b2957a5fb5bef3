"""A pair run: the memory plan, stepping, metrics, lens, attribution, branches, noise, rerun."""
