"""Import paths kept for users of the reference tool."""
