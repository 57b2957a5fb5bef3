"""--model names resolved and loaded: aliases, the embedded model, tiny and random shapes, tokens."""
