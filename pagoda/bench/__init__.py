"""`pagoda bench`: backend registry, grids, timing and reports shared by every study."""
