"""The compiler version is part of every kernel cache key: bump it when output changes."""

COMPILER_VERSION = "tezzeret-1"
