"""HTTP layer: thin routes, dependency aliases, the RFC 9457 error handler."""
