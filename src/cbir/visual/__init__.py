"""Pictures people look at: result grids (search, training) and plots."""
