"""Small example data bundled with dpm (the Li demo map)."""
