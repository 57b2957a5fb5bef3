"""Sweeps: prompts × specs × modes, recorded headless, resumed, tabulated, on Ray."""
