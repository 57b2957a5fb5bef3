"""`hierui check`: the self-test of hierui's numbers on a model."""
