"""Use cases. Each takes a session and never commits: the route or the task does."""
