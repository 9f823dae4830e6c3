"""Runnable examples: the `make demo` job, the two-line integration, and the experiment library
the growth benchmark shares (`examples.morphogenesis`)."""
