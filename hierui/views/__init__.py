"""What the commands print on a terminal: sessions, sweeps, kld, check, noise."""
