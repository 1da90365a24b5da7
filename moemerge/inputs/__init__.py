"""What a merge reads: the recipe, the models and adapters it names, their files, prompts and vocabularies."""
