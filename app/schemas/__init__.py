"""Wire contracts (pydantic) shared by the API and the client. No ORM or engine imports."""
