"""Tools: checkpoint converters."""
