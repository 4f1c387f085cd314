"""The steps of a scoring run, each one thing: load, prompts, tokenize, context, rouge, rank."""
