"""Kasmina: the runtime library training code imports. No Django import anywhere under it."""

__all__: list[str] = []
