"""The explorer's panels. Each renders step records; none computes a metric."""
