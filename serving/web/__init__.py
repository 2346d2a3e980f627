"""The web page: draw a digit and watch every serving target of the stack answer (see docs/web.md)."""
