"""The bundled toy world: scenes, questions, data, examples, the domain check, the tiny VLM."""
