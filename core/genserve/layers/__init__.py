"""Building blocks the model plugins are written against."""
