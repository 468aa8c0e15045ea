"""File input and output: pattern readers, map writers, EMsoft master-pattern files."""
