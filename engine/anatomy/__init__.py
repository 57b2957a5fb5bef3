"""Where things are in a loaded decoder: its layers, sublayers and weight matrices."""
