"""The router process: OpenAI HTTP in front, a pool of worker processes behind."""
