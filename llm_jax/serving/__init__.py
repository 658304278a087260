"""OpenAI-compatible HTTP serving of a continuous-batching engine (`app.create_app`)."""
