"""A sweep's output folder read as data: runs, localization, paired statistics."""
