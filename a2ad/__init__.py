"""a2ad: the A2A delivery daemon."""
